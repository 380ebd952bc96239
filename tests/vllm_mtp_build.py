"""Test helper (run in a child process with verify/_cpu_site on PYTHONPATH): build vLLM's main model and its
MTP drafter in one process, as speculative decoding does, and print the outcome.

    python tests/vllm_mtp_build.py CONFIG_DIR
"""
import sys

from m3_verify.vllm_check import _build_model

out_dir = sys.argv[1]
model, mc, _ = _build_model(out_dir, mtp=False)
print("MAIN", type(model).__name__, flush=True)
from vllm.config import ParallelConfig, SpeculativeConfig, get_current_vllm_config  # noqa: E402
from vllm.model_executor.model_loader.utils import initialize_model  # noqa: E402
import torch  # noqa: E402
from vllm.utils.torch_utils import set_default_torch_dtype  # noqa: E402

vc = get_current_vllm_config()
sc = SpeculativeConfig(method="mtp", num_speculative_tokens=1, target_model_config=mc, target_parallel_config=ParallelConfig())
vc.speculative_config = sc
try:
    with set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        draft = initialize_model(vllm_config=vc, model_config=sc.draft_model_config)
    print("DRAFT", type(draft).__name__, flush=True)
except Exception as e:   # the outcome is the test's to judge
    print("DRAFT-FAILED", type(e).__name__, str(e)[:200], flush=True)
