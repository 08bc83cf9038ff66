"""Makes ``pipeline`` importable when a job runs from a checkout that is not installed
(``ray job submit --working-dir . -- python jobs/<step>.py``)."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
