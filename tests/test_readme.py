"""README.md: the quick start is what CI runs, and the documented commands parse."""
import os
import re
import shlex

from tests.conftest import REPO_ROOT


def _quick_start():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands():
    commands = _quick_start()
    assert len(commands) == 2
    assert "pytest" in commands[1] and "pytest" not in commands[0]


def _ci_lines():
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        return [line.strip() for line in f]


def test_ci_runs_the_readme_test_command_word_for_word():
    assert _quick_start()[1] in _ci_lines()


def test_ci_runs_the_readme_main_job_and_checks_the_lines_the_readme_promises():
    """Quick-start command 1 runs in CI word for word, and CI greps its output for exactly the
    average lines the README shows after it."""
    assert _quick_start()[0] in _ci_lines()
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    promised = re.search(r"```text\n(.*?)```", text.split("## Quick start", 1)[1], re.S).group(1)
    promised = [line for line in promised.splitlines() if line.startswith("Average ")]
    grepped = [shlex.split(line)[-2] for line in _ci_lines() if line.startswith("grep -qxF")]
    assert len(promised) == 2 and grepped == promised


def test_quick_start_main_job_needs_no_download():
    words = shlex.split(_quick_start()[0].split("&&")[-1])
    assert words[1].startswith("main_test_fbcnn_") and "--model" in words
    model = words[words.index("--model") + 1]
    from models.model_zoo import MODEL_ZOO
    assert model == "jpeg" or os.path.isfile(
        os.path.join(REPO_ROOT, "model_zoo", MODEL_ZOO[model].filename))


def test_the_product_names_no_folder_outside_the_users_clone():
    """Messages, docs and option files speak of the user's clone and data, never of the folder
    beside this project's own checkouts where its large data sits, nor of the GPU lending of
    this project's own sessions."""
    found = []
    for top in ("README.md", "docs", "runners", "models", "data", "utils", "options",
                "benchmarks", "app.py", "hubconf.py", "main_restore.py", "main_train_fbcnn.py"):
        path = os.path.join(REPO_ROOT, top)
        files = [path] if os.path.isfile(path) else [
            os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
            if name.endswith((".py", ".md", ".json"))]
        for name in files:
            with open(name, encoding="utf-8") as f:
                text = f.read()
            if any(word in text for word in ("../shared", "$OUT", "GPU machine", "64 MiB")):
                found.append(os.path.relpath(name, REPO_ROOT))
    assert not found


def test_the_cpu_install_line_pins_the_pair_the_test_command_keeps():
    """docs/install.md's CPU-only PyTorch line installs exactly the torch and torchvision
    versions quick start 2 asks for, so neither quick-start command replaces the CPU build."""
    with open(os.path.join(REPO_ROOT, "docs", "install.md")) as f:
        text = f.read()
    cpu = [line for line in text.splitlines() if "download.pytorch.org/whl/cpu" in line
           and line.lstrip().startswith("python3 -m venv")]
    assert len(cpu) == 1

    def pins(command):
        return sorted(w for w in shlex.split(command) if w.startswith(("torch==",
                                                                       "torchvision==")))
    assert pins(cpu[0]) == pins(_quick_start()[1]) and len(pins(cpu[0])) == 2


def test_the_readme_is_a_front_door():
    """Read in five minutes: at most 12,000 bytes, with the picture of a restoration, the way
    to restore one's own photos right after the quick start, and every doc it links there."""
    with open(os.path.join(REPO_ROOT, "README.md"), "rb") as f:
        raw = f.read()
    text = raw.decode()
    assert len(raw) <= 12_000
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[:2] == ["Quick start", "Restoring your own photos"]
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert os.path.isfile(os.path.join(REPO_ROOT, link)), link
    assert "](docs/restored.png)" in text
