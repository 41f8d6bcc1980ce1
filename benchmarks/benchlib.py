"""What the benchmark scripts share: the model argument, FLOP counts, peak memory, tables, JSON.

This module owns how a benchmark gets its model (`--model` as the test scripts take it, or
`--random-init` with `--nc`/`--nb` where no weights are at hand: speed does not depend on the
weights' values), how FLOPs are counted (analytically, from the network's widths and depth), how
peak memory is read (CUDA allocator peak; on CPU the process's peak resident set, reset between
measurements through /proc/self/clear_refs where Linux allows it), and how results are printed
(a plain text table) and saved (`--json`).
"""
import ctypes
import ctypes.util
import json
import os
import platform
import resource

import torch

from models.model_zoo import LoadedModel, load_model
from models.network_fbcnn import FBCNN
from utils import REPO_ROOT
from utils.fileio import atomic_write_bytes

__all__ = ["add_model_args", "add_training_option_args", "build_model", "fbcnn_conv_flops",
           "PeakMemory", "device_name", "print_table", "write_json", "REPO_ROOT"]


def add_model_args(parser):
    parser.add_argument("--model", default=None,
                        help="a zoo name or weight file, as the test scripts take it")
    parser.add_argument("--random-init", action="store_true",
                        help="a randomly initialised FBCNN of --nc/--nb (no weights needed)")
    parser.add_argument("--nc", type=int, nargs=4, default=[64, 128, 256, 512],
                        help="channel widths for --random-init (default: full FBCNN)")
    parser.add_argument("--nb", type=int, default=4, help="blocks per stage for --random-init")
    parser.add_argument("--in-nc", type=int, choices=(1, 3), default=3,
                        help="image channels for --random-init (default %(default)s)")


def add_training_option_args(parser):
    """`--opt` and `--set` of the training benchmarks, as main_train_fbcnn.py takes them."""
    parser.add_argument("--opt", default=os.path.join(REPO_ROOT, "options",
                                                      "train_fbcnn_color.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="option overrides, as main_train_fbcnn.py takes them")


def build_model(args, device):
    """The LoadedModel the arguments ask for, on `device`, in eval mode."""
    if args.random_init == (args.model is not None):
        raise SystemExit("error: give exactly one of --model and --random-init")
    if args.model is not None:
        return load_model(args.model, device=device)
    torch.manual_seed(0)
    net = FBCNN(in_nc=args.in_nc, out_nc=args.in_nc, nc=args.nc, nb=args.nb).eval().to(device)
    label = f"random_nc{'-'.join(map(str, args.nc))}_nb{args.nb}"
    return LoadedModel(label, net, args.in_nc)


def fbcnn_conv_flops(net, height, width, with_qf_head=True):
    """FLOPs (a multiply-add counts 2) of the convolutions of one forward pass on an image of
    `height` x `width`, padded to a multiple of 8 as the network pads it.

    Counted analytically from the widths and depth (strideconv/convtranspose, the released
    layout); the MLPs of the QF head and embedding cost about 1.6 MFLOP per image and are left
    out. `with_qf_head=False` leaves out the QF head's residual blocks too (tiled passes that
    only restore).
    """
    c0, c1, c2, c3 = net.nc
    nb = net.nb
    h, w = -(-height // 8) * 8, -(-width // 8) * 8
    area = [h * w, h * w / 4, h * w / 16, h * w / 64]

    def conv3(c_in, c_out, a):
        return 2 * 9 * c_in * c_out * a

    def res_blocks(c, a):
        return nb * 2 * conv3(c, c, a)

    flops = conv3(net.in_nc, c0, area[0]) + conv3(c0, net.out_nc, area[0])  # head, tail
    for c_in, c_out, k in ((c0, c1, 0), (c1, c2, 1), (c2, c3, 2)):
        flops += res_blocks(c_in, area[k])  # encoder blocks at this scale
        flops += 2 * 4 * c_in * c_out * area[k + 1]  # 2x2 stride-2 conv down
        flops += 2 * 4 * c_out * c_in * area[k + 1]  # 2x2 transposed conv back up
        flops += res_blocks(c_in, area[k])  # QF-attention blocks at this scale
    flops += res_blocks(c3, area[3]) * (3 if with_qf_head else 2)  # body enc/dec, QF head
    return flops


class PeakMemory:
    """Peak memory of the code run inside `with`, in bytes (`.peak`) and what it measures
    (`.kind`): the CUDA allocator's peak on a GPU, the peak resident set size on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = None
        self.kind = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        elif _reset_peak_rss():
            self.kind = "peak RSS (VmHWM, reset before)"
        else:
            self.kind = "peak RSS since process start (ru_maxrss)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _peak_rss()
        return False


def _reset_peak_rss():
    try:  # hand freed heap back to the OS first, so an earlier measurement's leftovers don't count
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def _peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def device_name(device):
    """The processor or GPU the numbers were measured on, in words."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def print_table(rows, columns):
    """Print `rows` (dicts) as a Markdown table with the given (key, header, format) columns."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key])
                      for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)


def write_json(path, payload):
    """Write `payload` as JSON atomically (utils/fileio.py: nothing partial is left)."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode(), fsync=False)
