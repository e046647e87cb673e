"""Print pins for the CUDA/cuDNN wheels of TensorFlow's `and-cuda` extra: each at the lowest
version TensorFlow's own metadata allows, the CUDA and cuDNN release it was built against
(TensorFlow 2.21: CUDA 12.5, cuDNN 9.3). TensorFlow gives ranges (`<13.0,>=12.5.3.2`), so an
unpinned `pip install tensorflow[and-cuda]` takes whatever is newest on the day the image is
built. `make lock` writes this to cluster/requirements-gpu.lock from the TensorFlow it pins;
cluster/Dockerfile installs with it as a constraint."""
import importlib.metadata as md

from packaging.requirements import Requirement


def cuda_pins() -> list:
    pins = []
    for text in md.requires("tensorflow") or ():
        req = Requirement(text)
        if req.marker is None or not req.marker.evaluate({"extra": "and-cuda"}) or req.marker.evaluate({"extra": ""}):
            continue
        lowest = [s.version for s in req.specifier if s.operator == ">="]
        if len(lowest) != 1:
            raise SystemExit(f"tensorflow[and-cuda] requires {text!r}: no single lower bound to pin")
        pins.append(f"{req.name}=={lowest[0]}")
    if not pins:
        raise SystemExit("the installed tensorflow has no and-cuda extra")
    return sorted(pins)


if __name__ == "__main__":
    print(f"# TensorFlow {md.version('tensorflow')}'s and-cuda wheels (cluster/cuda_pins.py; `make lock`)")
    print("\n".join(cuda_pins()))
