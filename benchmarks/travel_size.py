"""How much a run on the GPU machine would carry: the working tree plus the carried folders.

    python benchmarks/travel_size.py                      # tracked files + trainsets/train_pack
    python benchmarks/travel_size.py --carry trainsets/train_pack model_zoo/extra --json t.json

A command on the GPU machine gets a copy of the repository: the tracked files, the untracked
files git does not ignore, and the ignored paths named to be carried along (the training tiles
of benchmarks/gpu_train_lite.py, `trainsets/train_pack`), at most 64 MiB in all. This prints
each part, the total and what is left, tracked files by top-level folder, and exits with
status 1 when the total is over the limit (tests/test_benchmarks.py checks it too), so that
shipped weights or new test data do not silently push a GPU run over it.

A carried folder missing from the checkout is counted from `../shared/<path>` (where the
project's shared data sits beside a checkout), else at its recorded size (`RECORDED_BYTES`).
"""
import argparse
import os
import subprocess
import sys

from benchmarks.benchlib import REPO_ROOT, print_table, write_json
from models.select_network import define_G
from runners.train_options import load_options

__all__ = ["LIMIT_BYTES", "RECORDED_BYTES", "DEFAULT_CARRY", "measure", "main"]

LIMIT_BYTES = 64 * 2 ** 20
DEFAULT_CARRY = ("trainsets/train_pack",)
# sizes of carried folders as last measured (du -sb), for checkouts that have neither the
# folder nor ../shared: trainsets/train_pack is 269 PNG tiles of 256x256
RECORDED_BYTES = {"trainsets/train_pack": 31_429_085}


def _git_files(repo, *options):
    out = subprocess.run(["git", "-C", repo, "ls-files", "-z", *options], check=True,
                         capture_output=True).stdout
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def _file_bytes(path):
    try:
        return os.lstat(path).st_size  # a link travels as a link
    except OSError:
        return 0  # deleted but not yet committed: it does not travel


def _folder_bytes(path):
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(_file_bytes(os.path.join(folder, name)) for name in names)
    return total


def measure(repo=REPO_ROOT, carry=DEFAULT_CARRY):
    """The parts that would travel: {"parts": [{"part", "bytes", "files", "source"}],
    "by_folder": [{"folder", "bytes", "files"}], "total_bytes", "limit_bytes"}."""
    parts, by_folder = [], {}
    tracked = _git_files(repo)
    sizes = [_file_bytes(os.path.join(repo, name)) for name in tracked]
    for name, size in zip(tracked, sizes):
        top = name.split("/", 1)[0] if "/" in name else "(top level)"
        entry = by_folder.setdefault(top, {"folder": top, "bytes": 0, "files": 0})
        entry["bytes"] += size
        entry["files"] += 1
    parts.append({"part": "tracked files", "bytes": sum(sizes), "files": len(tracked),
                  "source": "git ls-files"})
    untracked = _git_files(repo, "--others", "--exclude-standard")
    parts.append({"part": "untracked, not ignored", "files": len(untracked),
                  "bytes": sum(_file_bytes(os.path.join(repo, n)) for n in untracked),
                  "source": "git ls-files --others --exclude-standard"})
    for path in carry:
        here = os.path.join(repo, path)
        shared = os.path.join(os.path.dirname(os.path.abspath(repo)), "shared", path)
        if os.path.isdir(here):
            size, source = _folder_bytes(here), here
        elif os.path.isdir(shared):
            size, source = _folder_bytes(shared), shared
        elif path in RECORDED_BYTES:
            size, source = RECORDED_BYTES[path], "recorded size (folder not found)"
        else:
            size, source = 0, "not found"
        parts.append({"part": f"carried: {path}", "bytes": size, "files": None,
                      "source": source})
    total = sum(p["bytes"] for p in parts)
    return {"parts": parts, "total_bytes": total, "limit_bytes": LIMIT_BYTES,
            "by_folder": sorted(by_folder.values(), key=lambda e: -e["bytes"])}


def lite_fp16_bytes():
    """Bytes of the GPU colour lite network's tensors in fp16 (options/train_fbcnn_color_lite.json's
    netG, BatchNorm folded: what benchmarks/gpu_train_lite.py writes, less its few-kB header)."""
    opt = load_options(os.path.join(REPO_ROOT, "options", "train_fbcnn_color_lite.json"),
                       ["netG.act_mode=R", "merge_bn=false"], world_size=1, check_paths=False)
    net = define_G(opt["netG"], initialize=False)
    return 2 * sum(t.numel() for t in net.state_dict().values())


def describe(result):
    """One line: the total against the limit, and each part."""
    parts = ", ".join(f"{p['part']} {p['bytes'] / 2 ** 20:.2f} MiB" for p in result["parts"])
    return (f"{result['total_bytes'] / 2 ** 20:.2f} MiB of {LIMIT_BYTES / 2 ** 20:.0f} MiB "
            f"would travel ({parts})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--carry", nargs="*", default=list(DEFAULT_CARRY),
                   help="ignored paths a GPU run carries along (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    result = measure(REPO_ROOT, args.carry)
    mib = [{**row, "mib": row["bytes"] / 2 ** 20} for row in result["parts"]]
    left = result["limit_bytes"] - result["total_bytes"]
    mib += [{"part": "total", "mib": result["total_bytes"] / 2 ** 20},
            {"part": "limit", "mib": result["limit_bytes"] / 2 ** 20},
            {"part": "left" if left >= 0 else "OVER BY", "mib": abs(left) / 2 ** 20}]
    print_table(mib, [("part", "part", "{}"), ("files", "files", "{}"), ("mib", "MiB", "{:.2f}"),
                      ("source", "counted from", "{}")])
    print()
    print_table([{**row, "mib": row["bytes"] / 2 ** 20} for row in result["by_folder"]],
                [("folder", "tracked folder", "{}"), ("files", "files", "{}"),
                 ("mib", "MiB", "{:.2f}")])
    lite = lite_fp16_bytes()
    print(f"\nA colour GPU lite network in fp16 (options/train_fbcnn_color_lite.json) is "
          f"{lite / 2 ** 20:.2f} MiB: {'it fits' if lite <= left else 'it does not fit'} in "
          f"what is left.")
    if args.json:
        write_json(args.json, {**result, "lite_fp16_bytes": lite})
    return 0 if left >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
