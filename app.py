"""FBCNN web demo: `python app.py [--model PATH_OR_NAME] [--port 7860]`.

Serves on 127.0.0.1 and prints the address; needs `pip install -r requirements-demo.txt`.
The page and its options are in runners/demo.py.
"""
import sys

from runners.demo import main

if __name__ == "__main__":
    sys.exit(main())
