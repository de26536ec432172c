import os
import sys

# Triton's interpreter must be chosen before triton is first imported (torch._dynamo imports it):
# the kernel tests run the Triton kernels on CPU through it.
os.environ.setdefault("TRITON_INTERPRET", "1")


# the tests import their helper modules (models, dist_harness, _checks_*) by name, also in
# spawned worker processes (which inherit PYTHONPATH)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
