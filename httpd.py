"""HTTP transport hardening on the standard library's http.server, for a server that faces
unfriendly clients; it knows nothing of what is served (server.py puts the OpenAI API on top).

    python server.py --timeout 30 --max-connections 256     # the defaults
    python server.py --timeout 5 --max-connections 1024     # impatient with clients, more of them

- One daemon thread per connection, at most max_connections; the next ones get a quick 503
  + Retry-After. A listen backlog sized for bursts; the open-files limit lifted to fit.
- A timeout on every read and write, so stalled clients and streams nobody reads end;
  client_gone() for handlers that wait; TCP_NODELAY. The request line and headers (and the
  wait for them on a kept-alive connection) get a short deadline of their own, in all, so
  clients that never finish them (slowloris) cannot hold the cap for the whole timeout.
- Content-Length parsed strictly (RFC 9112 section 6.3); a JSON body nested too deeply or
  holding a huge integer is a 400, never a 500.
- until_signal() waits for SIGINT / SIGTERM; server_close() lets busy handlers finish, then
  ends every connection.

Left out: HTTPS and HTTP/2 (put a reverse proxy in front), chunked request bodies, rate limits.
"""

import contextlib
import errno
import json
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # bytes; a 128k-token prompt is well under this
TIMEOUT_S = 30.0  # default --timeout: each read of a request's body and each write of a response
HEADER_TIMEOUT_S = 5.0  # the request line and headers, all of them, from the start of the wait (at most the timeout)
MAX_CONNECTIONS = 256  # default --max-connections: one thread each; past it, a quick 503
BACKLOG = 1024  # connections the kernel queues before accept(): a burst of new clients waits, not resets


class HTTPError(Exception):
    """A request this layer refuses (its framing or JSON); the application words the response."""
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# -----------------------------------------------------------------------------
# Framing

def content_length(values):
    """The body size from the Content-Length header(s). Repeated or listed values must
    agree (RFC 9112 section 6.3: otherwise the message is invalid, and a proxy that read
    the other value would see a second, smuggled request in the rest of the body)."""
    if not values:
        raise HTTPError(411, "a POST needs a Content-Length header")
    found = {v.strip() for value in values for v in value.split(",")}
    if len(found) != 1:
        raise HTTPError(400, f"conflicting Content-Length headers {sorted(found)}; send one")
    length = found.pop()
    if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, int("²") is not
        raise HTTPError(400, f"Content-Length {length[:20]!r} is not a non-negative decimal integer")
    digits = length.lstrip("0") or "0"
    if len(digits) > len(str(MAX_BODY)) or int(digits) > MAX_BODY:  # never int() 5,000 digits
        raise HTTPError(413, f"the body is {digits[:20]}{'...' if len(digits) > 20 else ''} bytes; "
                        f"the limit is {MAX_BODY}")
    return int(digits)


class Handler(BaseHTTPRequestHandler):
    """Keep-alive, the server's timeout on every read and write, a strict body reader, a disconnect check."""
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body are separate writes; without it the
    # body waits for the client's delayed ACK (tens of ms per response on Linux), and streamed events bunch up

    def setup(self):
        self.timeout = self.server.timeout  # every read and write of this connection; None: wait forever
        super().setup()

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def handle_one_request(self):
        """One request, whose request line and headers must all arrive by the server's header
        deadline (it ends the connection otherwise); the body and the response get --timeout."""
        self.server.head_by(self.connection, time.monotonic() + self.server.header_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.head_by(self.connection, None)

    def parse_request(self):  # reads the headers: the deadline ends here
        try:
            return super().parse_request()
        finally:
            self.server.head_by(self.connection, None)

    def read_json(self):
        """The body, a JSON object, read by its Content-Length."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HTTPError(411, "send the body with a Content-Length header; chunked uploads are not supported")
        try:
            body = json.loads(self.rfile.read(content_length(self.headers.get_all("Content-Length"))).decode())
        except UnicodeDecodeError as e:
            raise HTTPError(400, f"the body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise HTTPError(400, "the body is not acceptable JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, and integers past Python's int-string limit
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the body must be a JSON object, not {type(body).__name__}")
        return body

    def client_gone(self):
        """True once the peer has closed: the socket reads as ready but yields no bytes."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# -----------------------------------------------------------------------------
# The server, and the process around it

class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that keeps track of its threads, so server_close() can end them
    (an idle keep-alive handler holding a model's tensors into interpreter exit can abort
    the process there), caps them at max_connections, and has a listen backlog sized for
    bursts (Python's default of 5 resets the rest), and ends connections whose request
    line and headers are late. Handlers call busy(+1) / busy(-1) and head_by()."""

    request_queue_size = BACKLOG

    def __init__(self, address, handler, timeout=TIMEOUT_S, max_connections=MAX_CONNECTIONS, log_requests=False,
                 reject_body=b'{"error": "too many connections; retry shortly"}',  # JSON, with the 503 past the cap
                 header_timeout=HEADER_TIMEOUT_S):
        self.timeout, self.max_connections = timeout, max_connections  # timeout: per read / write, seconds
        self.header_timeout = min(header_timeout, timeout or header_timeout)  # never longer than the timeout
        self.log_requests, self.reject_body = log_requests, reject_body
        self._lock = threading.Lock()
        self._handlers = {}  # open connection -> its thread
        self._heads = {}  # connection whose request line and headers are awaited -> their deadline
        self._rejecting = self._busy = 0  # connections being answered 503; handlers inside a request
        super().__init__(address, handler)  # subtle: last, as a failed bind calls our server_close()

    def busy(self, change):
        with self._lock:
            self._busy += change

    def head_by(self, connection, deadline):
        """The request line and headers on `connection` must arrive by `deadline` (time.monotonic()); None: done."""
        with self._lock:
            if deadline is None:
                self._heads.pop(connection, None)
            else:
                self._heads[connection] = deadline

    def service_actions(self):
        """serve_forever() calls this every poll_interval: end the connections whose head is late. A deadline
        for the head in all, not per read, as a client could otherwise send a byte every few seconds."""
        now = time.monotonic()
        with self._lock:
            for connection in [c for c, deadline in self._heads.items() if deadline < now]:
                del self._heads[connection]
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # the handler's read returns: it closes the connection

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:  # out of file descriptors: back off instead of spinning on accept()
            if e.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)
            raise

    def process_request(self, request, client_address):
        with self._lock:
            if len(self._handlers) < self.max_connections:
                thread = self._handlers[request] = threading.Thread(
                    target=self.process_request_thread, args=(request, client_address), daemon=True)
            elif self._rejecting < self.max_connections:
                self._rejecting += 1
                thread = threading.Thread(target=self._reject, args=(request,), daemon=True)
            else:  # a flood: not even a 503
                thread = None
        if thread is None:
            request.close()
        else:
            thread.start()

    def _reject(self, connection):
        """503 + Retry-After for a connection past max_connections. The request is read
        first (briefly): closing a socket with unread bytes resets it, and the client
        would see the reset instead of the answer."""
        body = self.reject_body
        try:
            connection.settimeout(1.0)
            received = b""
            while b"\r\n\r\n" not in received and len(received) < 65536 and (chunk := connection.recv(65536)):
                received += chunk
            connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            connection.shutdown(socket.SHUT_WR)
            while connection.recv(65536):  # until the client closes (or the timeout)
                pass
        except OSError:
            pass
        finally:
            connection.close()
            with self._lock:
                self._rejecting -= 1

    def shutdown_request(self, request):
        with self._lock:
            self._handlers.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client leaving is no error
            super().handle_error(request, client_address)

    def server_close(self, timeout=1.0):
        """Close the listening socket; give handlers busy with a request up to `timeout` s
        to finish, then end every open connection and join the handler threads."""
        super().server_close()
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            handlers = dict(self._handlers)
        for connection in handlers:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)  # an idle handler's readline returns: it exits
        for thread in handlers.values():
            thread.join(max(0.1, deadline - time.monotonic()))


def raise_open_files_limit(connections):
    """Two descriptors per connection at worst (a handler's and a rejected one's), plus
    the application's files: lift the soft limit toward the hard one if it is lower
    (Linux's default soft limit of 1,024 runs out at about a thousand stalled clients)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 2 * connections + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform, or not allowed: the cap still bounds what we use


def until_signal(work, name="work"):
    """Run work() in a daemon thread and wait for SIGINT / SIGTERM. Returns None after
    a signal, or the exception work() raised (it ends the wait at once)."""
    stop, failed = threading.Event(), []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def run():
        try:
            work()
        except Exception as e:
            failed.append(e)
            stop.set()
    threading.Thread(target=run, name=name, daemon=True).start()
    while not stop.wait(0.5):  # a timed wait, on the main thread, where the signal handlers run
        pass
    return failed[0] if failed else None
