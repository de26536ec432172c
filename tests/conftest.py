import os
import sys

# the tests import their helper modules (models, dist_harness, _checks_*) by name, also in
# spawned worker processes (which inherit PYTHONPATH)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
