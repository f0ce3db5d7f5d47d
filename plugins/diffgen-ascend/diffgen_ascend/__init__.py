"""diffgen-ascend: msmodelslim checkpoints on Ascend NPUs, NVIDIA GPUs and the CPU.

``plugin`` holds the hooks (entry point ``ascend`` in group ``diffgen``); ``description`` detects
msmodelslim checkpoints; ``schemes`` defines each scheme's tensors and forward; ``numerics`` the
Ascend rounding rules; ``methods`` the reference and NVIDIA linear methods; ``npu`` the torch_npu
adapters; ``names`` Wan and msmodelslim names; ``repack_wan`` the ``wan`` converter. Importing this
package never imports torch_npu.
"""

__version__ = "0.1.0"
