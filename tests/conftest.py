import os

# Tests never reach a model hub: everything they load, they build first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: ranks share 2 cores

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a busy 2-core machine
# oversubscribed threads made some tests 8x slower.
torch.set_num_threads(1)
