"""Test shim, on PYTHONPATH for the FSDP tests only: lets accelerate run FSDP2 on CPU processes (gloo).

accelerate 1.15 turns FSDP on only for accelerators (AcceleratorState sets DistributedType.FSDP for
MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU), so on CPU it drops the FSDP plugin and wraps the model in
DDP. torch's FSDP2 (fully_shard) itself runs on CPU over gloo; this does, on CPU, what AcceleratorState
does on a GPU: from there on accelerate's own FSDP2 code prepares, clips, saves, loads and gathers.
"""

import os

if os.environ.get("RESHAPE_TEST_FSDP_ON_CPU") == "1":
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _init = _state.AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # as AcceleratorState.__init__ does for a GPU
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if os.environ.get("RESHAPE_TEST_EXIT_AT_STEP"):
    # A crash at a known optimizer step, in every process (as a kill -9 of the job would end it), for resume tests.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _steps = [0]

    def _exit_at_step(*_):
        _steps[0] += 1
        if _steps[0] == int(os.environ["RESHAPE_TEST_EXIT_AT_STEP"]):
            os._exit(3)

    register_optimizer_step_post_hook(_exit_at_step)
