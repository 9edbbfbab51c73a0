import os
import sys

# Tests import the oracles as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
# tests/llava/ would otherwise shadow the `llava` package (served by the editable install's
# import hook, which comes after sys.path): put its real location on sys.path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "LLaVA"))
