# Setup: on Colab, fetch the course and its requirements; elsewhere, find this checkout's root.
import os, sys  # noqa: E401
REPO_URL = "https://github.com/rearchitecting-llms/course"
if "google.colab" in sys.modules and not os.path.isdir("course"):
    os.system(f"git clone -q --depth 1 {REPO_URL} course && pip install -q -r course/requirements.txt")
root = os.path.abspath("course" if "google.colab" in sys.modules else os.getcwd())
while not os.path.isfile(os.path.join(root, "utils", "__init__.py")) and root != os.path.dirname(root):
    root = os.path.dirname(root)
sys.path.insert(0, root)
