"""The CPU stand-ins the Megatron tests' gloo ranks install: one copy, shared with the
launcher (``launch/megatron/cpu_shims.py``, which documents each of them)."""

from launch.megatron.cpu_shims import install

__all__ = ["install"]
