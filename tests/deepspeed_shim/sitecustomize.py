"""Test-only shim (docs/design.md section 7): lets `accelerate launch --config_file deepspeed_zero*.yaml` run
DeepSpeed on CPU processes. DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) talks gloo, but accelerate's
backend detection finds no backend without CUDA and refuses; answer gloo there when a launcher started us.
Put this directory on the launched processes' PYTHONPATH; it never ships with a script."""

import importlib
import os

if os.environ.get("LOCAL_RANK") is not None:
    try:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        _original = PartialState._prepare_backend

        def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            found, distributed_type = _original(self, cpu, sagemaker_dp, backend)
            if found is None:
                return "gloo", DistributedType.MULTI_CPU
            return found, distributed_type

        PartialState._prepare_backend = _prepare_backend
    except ImportError:  # accelerate absent: behave as without the shim
        pass
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (deepspeed_shm_comm, ~60 s
        # of C++ on 2 cores the first time). It is a CPU-only speed-up that no GPU run uses; plain gloo
        # all-reduce is what the tests need, so skip the build.
        # (importlib: the attribute deepspeed.comm.torch is the torch package, not this module)
        try:
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        except ImportError:
            pass
