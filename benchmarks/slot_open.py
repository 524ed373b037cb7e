"""What pinning an installed slot by its manifest digest saves when the device agent opens it.

A package with a large artifact is built and unpacked into a slot directory, the way the
device agent installs one: an ONNX model whose one MatMul weight is ``--mib`` MiB of
float32 (default 100 MiB; built with the ``onnx`` helper API, nothing downloaded). Then,
interleaved over ``--rounds`` rounds (each round runs every variant once, in a rotating
order), it times:

* ``verify full``:   ``verify_directory(slot)``: signature, schema, every file's size and SHA-256;
* ``verify pinned``: ``verify_directory(slot, manifest_digest=...)``: the manifest's digest and
  signature, every file's type and size, no contents hashed;
* ``open full``:     ``edgeship.runtime.open(slot)`` + ``close()`` (verification, artifact check, ORT load);
* ``open pinned``:   the same with ``manifest_digest=...``.

The page cache is warm after the first round (the files were just written): these are the
figures of a device that re-opens a slot it recently used; on a cold cache the full
verification also pays for reading every byte from flash. The machine is shared, so trust
the ratios of the interleaved medians more than absolute times.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.slot_open [--mib 100] [--rounds 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _cpu() -> tuple[str, list[str]]:
    """CPU model name and the flags that matter for these figures (SIMD width, SHA extensions)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "sha_ni", "aes")
    return model, [f for f in wanted if f in flags]


def build(work: Path, mib: int) -> tuple[Path, Path, str]:
    """Write a signed package with a ``mib``-MiB ONNX artifact, unpack it as a slot; return (slot, key, digest)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeship.runtime.package import (
        Golden,
        Manifest,
        Provenance,
        TensorSpec,
        load_private_key,
        unpack_package,
        write_keypair,
        write_package,
    )

    n = int(np.sqrt(mib * (1 << 20) / 4))
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    artifact = work / "big.onnx"
    onnx.save(model, str(artifact))
    x = rng.standard_normal((1, 1, n), dtype=np.float32)
    golden = work / "vectors.npz"
    np.savez(golden, **{"input:x": x, "output:y": x @ weight})
    write_keypair(work / "keys", "bench")
    draft = Manifest(
        name="big-matmul",
        version=1,
        target="linux-x86_64",
        format="onnx",
        precision="fp32",
        artifact_path="model/big.onnx",
        inputs=(TensorSpec("x", "float32", (1, n)),),
        outputs=(TensorSpec("y", "float32", (1, n)),),
        files=(),
        golden=Golden("golden/vectors.npz", rtol=1e-3, atol=1e-3),
        provenance=Provenance(tools={"benchmark": "slot_open"}),
    )
    package = work / "big.edgepkg"
    write_package(
        package,
        draft,
        {"model/big.onnx": artifact, "golden/vectors.npz": golden},
        [load_private_key(work / "keys/bench.key")],
    )
    artifact.unlink()
    slot = work / "slot-a"
    public = work / "keys/bench.pub"
    from edgeship.runtime.package import TrustedKeys, load_public_key

    verified = unpack_package(package, slot, trusted_keys=TrustedKeys.of([load_public_key(public)]))
    package.unlink()
    return slot, public, verified.digest


def measure(slot: Path, public: Path, digest: str, rounds: int) -> dict[str, list[float]]:
    import edgeship.runtime as rt
    from edgeship.runtime.package import TrustedKeys, load_public_key, verify_directory

    trusted = TrustedKeys.of([load_public_key(public)])

    def open_and_close(**kwargs: Any) -> None:
        rt.open(slot, trusted_keys=trusted, threads=1, stats=False, **kwargs).close()

    variants: dict[str, Callable[[], object]] = {
        "verify full": lambda: verify_directory(slot, trusted_keys=trusted),
        "verify pinned": lambda: verify_directory(slot, trusted_keys=trusted, manifest_digest=digest),
        "open full": lambda: open_and_close(),
        "open pinned": lambda: open_and_close(manifest_digest=digest),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=100, help="size of the artifact's weight in MiB")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the first warms the cache)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    model, flags = _cpu()
    print("edgeship slot open benchmark: full verification vs pinned by manifest digest")
    print(f"  machine: {model}, {os.cpu_count()} CPUs, flags: {' '.join(flags) or 'none of avx2/avx512/sha_ni'}")
    print(f"  Python {platform.python_version()}, hashlib over {ssl.OPENSSL_VERSION}; shared machine, noisy timings")
    with tempfile.TemporaryDirectory(prefix="edgeship-slot-open-") as tmp:
        started = time.perf_counter()
        slot, public, digest = build(Path(tmp), args.mib)
        size = sum(p.stat().st_size for p in slot.rglob("*") if p.is_file())
        print(
            f"  slot: {size / (1 << 20):.1f} MiB in {len(list(slot.rglob('*')))} entries, built in "
            f"{time.perf_counter() - started:.1f} s; {args.rounds} interleaved rounds, the first dropped (warm-up)"
        )
        times = measure(slot, public, digest, args.rounds)
        data = (slot / "model/big.onnx").read_bytes()
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha_rate = len(data) / (time.perf_counter() - start) / (1 << 20)
    medians = {name: statistics.median(t[1:] if len(t) > 1 else t) for name, t in times.items()}
    print(f"  SHA-256 alone: {sha_rate:.0f} MiB/s")
    print(f"  {'variant':<14} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, t in times.items():
        kept = t[1:] if len(t) > 1 else t
        print(f"  {name:<14} {medians[name] * 1e3:>10.1f} {min(kept) * 1e3:>9.1f} {max(kept) * 1e3:>9.1f}")
    for kind in ("verify", "open"):
        full, pinned = medians[f"{kind} full"], medians[f"{kind} pinned"]
        print(f"  {kind}: pinned is {full / pinned:.1f}x faster ({(full - pinned) * 1e3:.0f} ms saved)")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "cpu": model,
                    "flags": flags,
                    "mib": args.mib,
                    "slot_bytes": size,
                    "sha256_mib_per_s": sha_rate,
                    "seconds": times,
                    "median_s": medians,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
