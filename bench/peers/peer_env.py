"""Process settings every peer script needs before torch/transformers are imported.

OpenMP and MKL read the thread count when their pools start, and no model hub is reachable (nor
needed: the GGUF files are local), so these must be set first.
"""

import os
import warnings


def configure(threads: int) -> None:
    """Thread count, offline mode, and silence for a warning that is not ours to fix."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers 5.24 calls its own deprecated is_gradient_checkpointing under PEFT.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
