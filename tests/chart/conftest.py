import sys
from pathlib import Path

# render.py sits next to the tests and is also a command-line tool; make it importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
