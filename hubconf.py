"""torch.hub entry points: one per name in models/model_zoo.MODEL_ZOO.

    net = torch.hub.load("path/to/this/repo", "fbcnn_color", source="local")
    restored, qf = net(x)            # x: (N, 3, H, W) in [0, 1]; QF = round(100 * (1 - qf))

Each entry point returns an FBCNN in eval mode. With `pretrained=True` (the default) its
weights come from models/model_zoo.py exactly as `--model NAME` gets them: `model_dir`, else the
environment variable FBCNN_MODEL_DIR, else the repository's model_zoo/, downloaded on first use
and verified by sha256 (the lite models ship with the repository). With `pretrained=False` it
is the entry's architecture, randomly initialised.
"""
from models.model_zoo import MODEL_ZOO, load_model

dependencies = ["torch", "numpy", "cv2", "tqdm", "safetensors"]


def _entry_point(name):
    entry = MODEL_ZOO[name]

    def load(pretrained=True, model_dir=None, device="cpu", progress=True):
        if not pretrained:
            return entry.build().to(device).eval()
        return load_model(name, device=device, model_dir=model_dir, progress=progress).net

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"FBCNN `{name}` ({entry.in_nc}-channel input), weights {entry.filename}.\n\n"
                    "pretrained: load the released weights (else random initialisation).\n"
                    "model_dir: folder holding or receiving the weight file.\n"
                    "device: where the network is put. progress: show the download bar.")
    return load


for _name in MODEL_ZOO:
    globals()[_name] = _entry_point(_name)
del _name
