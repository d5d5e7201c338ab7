"""Build DeepSpeed's JIT ops once per machine (cached under TORCH_EXTENSIONS_DIR).

On CPU the first ``deepspeed.initialize`` compiles the shared-memory comm op
(~50 s) and optimizer offload compiles CPU Adam (~75 s); doing it up front keeps
that time out of every training run and test.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = accel.create_op_builder(name)
        if builder is None:
            print(f"{name}: not available on {accel.device_name()}")
            continue
        builder.load()
        print(f"{name}: ready")


if __name__ == "__main__":
    main()
