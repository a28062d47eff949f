"""Test-only shim (DESIGN section 7): lets `accelerate launch --config_file deepspeed_zero*.yaml` run
DeepSpeed on CPU processes. DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) talks gloo, but accelerate's
backend detection finds no backend without CUDA and refuses; answer gloo there when a launcher started us.
Put this directory on the launched processes' PYTHONPATH; it never ships with a script."""

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
