"""Does the model follow its report? Prompt pairs, shared seeds, one-tailed t-tests (MedSyn Tables II-IV).

A `PromptPair` holds two reports that differ in one finding: `a` without it, `b` with it, and the
measures (keys of `medsyn.evaluation.measures.measure_volume`'s output, or derived ones, see `PAIR_MEASURES`)
that should move, each with its expected direction ("greater": b > a; "less": b < a). For each pair,
N samples per prompt are drawn with the same seeds on both sides, measured (the CT re-segmented by a
backend, the generated masks passed along), and compared with a one-tailed Welch two-sample t-test, as
in the paper, and a one-tailed paired t-test over the shared seeds.

Layout of the output directory (rerunning the same request reuses finished samples and measures):

    OUT/controllability.json   per pair and measure: prompts, seeds, values per sample, statistics, provenance
    OUT/report.md              the table (pair, measure, A and B mean +- sd, p, paired p, in direction)
    OUT/boxplots.png           one panel per pair and measure, the shared seeds joined by lines
    OUT/samples/<prompt id>/<i>/  the samples of one prompt (seed S + i); a prompt used by several pairs
                               is sampled once; <prompt id> is the first 12 hex digits of its sha256
    OUT/measures/<prompt id>/<i>.json   measure_volume's output for that sample (cache)
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats
from tqdm import tqdm

from medsyn.data.channels import LOBE_NAMES, MASK_CHANNELS
from medsyn.data.nifti import load_nifti
from medsyn.data.segment import DEFAULT_BACKEND, get_backend
from medsyn.errors import DataError
from medsyn.evaluation.measures import MEASURES, MEASURES_VERSION, measure_volume
from medsyn.generation.output import check_out_dir, package_versions, run_sampling
from medsyn.generation.stages import SampleOptions
from medsyn.io import atomic_path, write_json, write_text
from medsyn.weights import sha256_file

DIRECTIONS = ("greater", "less")
ALPHA = 0.01  # the significance bar the project uses
OUTPUT_NAMES = ("controllability.json", "report.md", "boxplots.png", "samples", "measures")
_LOBE_SLUGS = {label: name.replace(" ", "_") for label, name in LOBE_NAMES.items()}


def _lobe_nodules(measures: Mapping[str, Any], label: int) -> list[Mapping[str, Any]]:
    return [n for n in measures.get("nodules") or [] if int(n.get("lobe", 0)) == label]


def _lobe_entry(key: str, name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda m: None if m.get(key) is None else m[key].get(name)


def _derived() -> dict[str, Callable[[Mapping[str, Any]], float | None]]:
    """Measures computed from measure_volume's output, per lobe: nodule count and volume (from `nodules`),
    lobe volume of the re-segmentation (`lobe_ml`) and of the generated mask (`mask_lobe_ml`)."""
    out: dict[str, Callable[[Mapping[str, Any]], float | None]] = {}
    for label, slug in _LOBE_SLUGS.items():
        out[f"nodule_count_{slug}"] = lambda m, label=label: float(len(_lobe_nodules(m, label)))
        out[f"nodule_ml_{slug}"] = lambda m, label=label: float(
            sum(float(n["volume_ml"]) for n in _lobe_nodules(m, label))
        )
        out[f"lobe_ml_{slug}"] = _lobe_entry("lobe_ml", LOBE_NAMES[label])
        out[f"mask_lobe_ml_{slug}"] = _lobe_entry("mask_lobe_ml", LOBE_NAMES[label])
    return out


DERIVED_MEASURES = _derived()
PAIR_MEASURES = (*MEASURES, *DERIVED_MEASURES)  # what a pair may name


def check_measure(key: str) -> bool:
    """Whether `key` names a measure a pair may use (see `PAIR_MEASURES`)."""
    return key in PAIR_MEASURES


@dataclass(frozen=True)
class Measure:
    """A measure a pair should move, and which way: "greater" (b > a) or "less" (b < a)."""

    key: str
    direction: str = "greater"

    def __post_init__(self) -> None:
        if not check_measure(self.key):
            raise ValueError(f"unknown measure {self.key!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r}: expected one of {DIRECTIONS}")


@dataclass(frozen=True)
class PromptPair:
    """Two reports that differ in one finding: `a` without it, `b` with it."""

    name: str
    a: str
    b: str
    measures: tuple[Measure, ...]


# --- default pairs: full reports worded as the phantom reports the models learn from --------------------

_NORMAL = {
    "effusion": "There is no pleural effusion.",
    "heart": "Heart size is normal.",
    "emphysema": "There is no emphysema or bullae.",
    "lesions": "There are no suspicious pulmonary nodules.",
    "airspace": "There is no evidence of consolidation.",
}
_AIRWAY = "The central airways are patent."
_NORMAL_IMPRESSION = "No acute cardiopulmonary abnormality."


def report_with(impression: str | None = None, **findings: str) -> str:
    """A report text (Findings then Impression, as the models are conditioned) normal except `findings`."""
    unknown = set(findings) - set(_NORMAL)
    if unknown:
        raise ValueError(f"unknown finding section(s) {sorted(unknown)}; expected some of {list(_NORMAL)}")
    sentences = [findings.get(section, normal) for section, normal in _NORMAL.items()]
    return " ".join([*sentences, _AIRWAY, impression or _NORMAL_IMPRESSION])


NORMAL_REPORT = report_with()

DEFAULT_PAIRS: tuple[PromptPair, ...] = (
    PromptPair(
        "pleural_effusion", NORMAL_REPORT,
        report_with("Large bilateral pleural effusions.", effusion="There are large bilateral pleural effusions."),
        (Measure("effusion_ml"),),
    ),
    PromptPair(
        "cardiomegaly", NORMAL_REPORT, report_with("Cardiomegaly.", heart="There is moderate cardiomegaly."),
        (Measure("ctr"),),
    ),
    PromptPair(
        "bullous_emphysema", NORMAL_REPORT,
        report_with("Bullous emphysema.", emphysema="Severe centrilobular emphysema in the right upper lobe. "
                       "Several bullae in the right upper lobe."),
        (Measure("laa950_pct"),),
    ),
    PromptPair(
        "effusion_side",
        report_with("Large left pleural effusion.", effusion="There is a large left pleural effusion."),
        report_with("Large right pleural effusion.", effusion="There is a large right pleural effusion."),
        (Measure("effusion_left_ml", "less"), Measure("effusion_right_ml", "greater")),
    ),
    PromptPair(
        "nodule_right_upper", NORMAL_REPORT,
        report_with("Pulmonary nodule. Follow-up recommended.",
                       lesions="There is a 2.0 cm nodule in the right upper lobe."),
        (Measure("nodule_count_right_upper"), Measure("nodule_ml_right_upper")),
    ),
)  # fmt: skip


# --- pair files -------------------------------------------------------------------------------------------

_PAIR_KEYS = ("name", "a", "b", "measure", "direction", "measures")
_PAIR_FORMAT = (
    "expected a mapping with keys name, a, b (report texts), measure (a measure name) and optional "
    'direction ("greater": b > a, the default; or "less"), or measures: a list of {measure, direction}'
)


def _measure_entry(where: str, item: Any) -> Measure:
    if isinstance(item, str):
        item = {"measure": item}
    if not isinstance(item, Mapping):
        raise DataError(
            f'{where}: "measures" item {item!r}: expected a measure name or {{measure, direction}}'
        )
    extra = set(item) - {"measure", "direction"}
    if extra or "measure" not in item:
        what = f"unknown key(s) {sorted(map(str, extra))}" if extra else 'no key "measure"'
        raise DataError(f'{where}: "measures" item has {what}; expected keys measure and optional direction')
    return _measure(where, item["measure"], item.get("direction", "greater"))


def _measure(where: str, key: Any, direction: Any) -> Measure:
    if not isinstance(key, str) or not check_measure(key):
        raise DataError(
            f'{where}: "measure" {key!r} is unknown; expected one of {", ".join(MEASURES)}, or a per-lobe '
            "measure nodule_count_<lobe>, nodule_ml_<lobe>, lobe_ml_<lobe>, mask_lobe_ml_<lobe> (lobes "
            f"{', '.join(_LOBE_SLUGS.values())}, e.g. nodule_count_right_upper)"
        )
    if direction not in DIRECTIONS:
        raise DataError(
            f'{where}: "direction" {direction!r}: expected "greater" (b larger than a) or "less" (b smaller)'
        )
    return Measure(key, direction)


def pair_from_mapping(entry: Any, where: str) -> PromptPair:
    """A `PromptPair` from one entry of a pairs file; `where` ("FILE:LINE") starts every error message."""
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: got {type(entry).__name__} {entry!r}; {_PAIR_FORMAT}")
    unknown = [str(k) for k in entry if k not in _PAIR_KEYS]
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; {_PAIR_FORMAT}")
    for key in ("name", "a", "b"):
        if key not in entry:
            raise DataError(f'{where}: missing key "{key}"; {_PAIR_FORMAT}')
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise DataError(f'{where}: "{key}" is {entry[key]!r}; expected a non-empty text')
    if entry["a"].strip() == entry["b"].strip():
        raise DataError(
            f'{where}: "a" and "b" are the same text; expected two reports that differ in a finding'
        )
    if ("measure" in entry) == ("measures" in entry):
        what = "both" if "measure" in entry else "neither"
        raise DataError(f'{where}: {what} of "measure" and "measures" given; {_PAIR_FORMAT}')
    if "measure" in entry:
        measures = (_measure(where, entry["measure"], entry.get("direction", "greater")),)
    else:
        if "direction" in entry:
            raise DataError(f'{where}: "direction" goes inside each "measures" item; {_PAIR_FORMAT}')
        if not isinstance(entry["measures"], list) or not entry["measures"]:
            raise DataError(f'{where}: "measures" is {entry["measures"]!r}; expected a non-empty list')
        measures = tuple(_measure_entry(where, item) for item in entry["measures"])
    return PromptPair(entry["name"].strip(), entry["a"].strip(), entry["b"].strip(), measures)


def _yaml_entries(path: Path, text: str) -> list[tuple[Any, str]]:
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(data, list) or node is None:
        raise DataError(
            f"{path}: got {type(data).__name__}; expected a YAML list of pairs, each {_PAIR_FORMAT}"
        )
    return [(item, f"{path}:{sub.start_mark.line + 1} (pair {i + 1})")
            for i, (item, sub) in enumerate(zip(data, node.value, strict=True))]  # fmt: skip


def _jsonl_entries(path: Path, text: str) -> list[tuple[Any, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{n}"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not a JSON object ({err.msg}); {_PAIR_FORMAT}") from err
    return out


def load_pairs(path: str | Path) -> list[PromptPair]:
    """Prompt pairs from a YAML file (a list of mappings; .yaml, .yml, .json) or JSONL (.jsonl, .ndjson)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".jsonl", ".ndjson"):
        raise DataError(
            f"{path}: unknown pairs file type {suffix or '(none)'!r}; expected .yaml, .yml or .jsonl"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the pairs file ({err})") from err
    entries = _jsonl_entries(path, text) if suffix in (".jsonl", ".ndjson") else _yaml_entries(path, text)
    if not entries:
        raise DataError(f"{path}: no pairs in the file; {_PAIR_FORMAT}")
    pairs, seen = [], {}
    for entry, where in entries:
        pair = pair_from_mapping(entry, where)
        if pair.name in seen:
            raise DataError(
                f'{where}: "name" {pair.name!r} is used already at {seen[pair.name]}; expected unique'
            )
        seen[pair.name] = where
        pairs.append(pair)
    return pairs


# --- statistics ------------------------------------------------------------------------------------------


def _finite(values: Sequence[float | None]) -> np.ndarray:
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return x[np.isfinite(x)]


def _float(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _ttest(test: Callable, b: np.ndarray, a: np.ndarray, alternative: str, what: str) -> dict[str, Any]:
    """t and one-tailed p of `test(b, a)`, or nulls with the reason when the test is undefined."""
    if min(len(a), len(b)) < 2:
        return {"t": None, "p": None, "note": f"{what}: fewer than 2 values on a side"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = test(b, a, alternative=alternative)
    t, p = _float(result.statistic), _float(result.pvalue)
    note = None if p is not None else f"{what}: undefined (t = {result.statistic})"
    if caught and p is not None:  # e.g. values nearly identical: scipy warns that precision was lost
        note = f"{what}: {' '.join(str(caught[0].message).split())}"
    return {"t": t, "p": p, "note": note}


def pair_statistics(
    a_values: Sequence[float | None], b_values: Sequence[float | None], direction: str = "greater"
) -> dict[str, Any]:
    """Compare a measure between prompt A and prompt B in the prompted direction (b > a for "greater").

    Values that are None or not finite are left out; the paired test uses index i of both sides (the
    same seed) where both are finite. p: one-tailed Welch two-sample t-test; p_paired: one-tailed paired
    t-test. A test that is undefined (fewer than 2 values, no variance) gives t and p None and a note.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: expected one of {DIRECTIONS}")
    a, b = _finite(a_values), _finite(b_values)
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(b)}
    for side, x in (("a", a), ("b", b)):
        out[f"mean_{side}"] = float(x.mean()) if len(x) else None
        out[f"sd_{side}"] = float(x.std(ddof=1)) if len(x) > 1 else None
    effect = out["mean_b"] - out["mean_a"] if len(a) and len(b) else None
    out["effect"] = effect
    out["in_direction"] = effect is not None and (effect > 0 if direction == "greater" else effect < 0)

    if len(a) > 1 and len(b) > 1 and np.ptp(a) == 0 and np.ptp(b) == 0:
        two = {"t": None, "p": None, "note": f"two-sample: no variance within either prompt (a: all {a[0]:g}, "
                                             f"b: all {b[0]:g}); the t-test is undefined"}  # fmt: skip
    else:
        two = _ttest(lambda x, y, **kw: stats.ttest_ind(x, y, equal_var=False, **kw), b, a, direction,
                     "two-sample")  # fmt: skip
    out.update(t=two["t"], p=two["p"], p_note=two["note"])

    n = min(len(a_values), len(b_values))
    pa = np.array([np.nan if v is None else float(v) for v in a_values[:n]], dtype=np.float64)
    pb = np.array([np.nan if v is None else float(v) for v in b_values[:n]], dtype=np.float64)
    both = np.isfinite(pa) & np.isfinite(pb)
    pa, pb = pa[both], pb[both]
    out["n_paired"] = int(both.sum())
    d = pb - pa
    # seeds whose pair moved the prompted way: the sign test a reader can check by eye
    out["seeds_in_direction"] = int((d > 0).sum() if direction == "greater" else (d < 0).sum())
    if len(d) > 1 and np.ptp(d) == 0:
        paired = {"t": None, "p": None, "note": f"paired: every difference b - a is {d[0]:g}; the paired "
                                                "t-test is undefined"}  # fmt: skip
    else:
        paired = _ttest(stats.ttest_rel, pb, pa, direction, "paired")
    out.update(t_paired=paired["t"], p_paired=paired["p"], p_paired_note=paired["note"])
    return out


# --- sampling and measuring ------------------------------------------------------------------------------


def prompt_id(prompt: str) -> str:
    """The folder name of a prompt's samples: the first 12 hex digits of the sha256 of its text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def measure_value(measures: Mapping[str, Any], key: str) -> float | None:
    """The value of measure `key` (a key of measure_volume's output or a derived one); None if undefined."""
    if key in DERIVED_MEASURES:
        return DERIVED_MEASURES[key](measures)
    if key not in measures:
        raise DataError(
            f"measure {key!r} is not in measure_volume's output (keys: {', '.join(sorted(measures))}); "
            "expected one of them or a derived measure"
        )
    value = measures[key]
    if value is None:
        return None
    if isinstance(value, bool | int | float | np.number):
        return _float(value)
    if isinstance(value, Mapping):
        raise DataError(f"measure {key!r} is a mapping; expected a scalar measure, e.g. {key}_right_upper")
    raise DataError(f"measure {key!r} is {type(value).__name__}, not a number; expected a scalar measure")


def _sample_hashes(sample: Path) -> dict[str, str]:
    return {name: sha256_file(sample / f"{name}.nii.gz") for name in ("ct", *MASK_CHANNELS)}


def measure_sample(sample: Path, cache: Path, backend_name: str, backend) -> dict[str, Any]:
    """measure_volume of a sample folder (CT re-segmented by `backend`, generated masks given), cached in
    `cache` (a JSON file) and reused while the backend, the sample's files and the measures' definitions
    (`MEASURES_VERSION`) are the same."""
    hashes = _sample_hashes(sample)
    try:
        stored = json.loads(cache.read_text(encoding="utf-8"))
        same = (stored["backend"], stored["files"], stored.get("version")) == (
            backend_name,
            hashes,
            MEASURES_VERSION,
        )
        if same:
            return stored["measures"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hu, affine = load_nifti(sample / "ct.nii.gz")
    masks = {name: load_nifti(sample / f"{name}.nii.gz", dtype=np.uint8)[0] for name in MASK_CHANNELS}
    measures = measure_volume(hu, affine, masks, backend=backend)
    write_json(
        cache, {"backend": backend_name, "version": MEASURES_VERSION, "files": hashes, "measures": measures}
    )
    return json.loads(json.dumps(measures, default=str))


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that is not ours: a file, a link, `.`, home, a root; without `overwrite`,
    one holding anything but the files this command writes."""
    check_out_dir(out_dir, overwrite=True)
    if overwrite or not out_dir.is_dir():
        return
    foreign = sorted(
        p.name for p in out_dir.iterdir() if p.name not in OUTPUT_NAMES and not p.name.startswith(".")
    )
    if foreign:
        raise DataError(
            f"{out_dir}: holds files medsyn controllability did not write ({', '.join(foreign[:3])}); choose a "
            "new or empty directory, or pass --overwrite to write beside them (they are kept)"
        )


def run_controllability(
    base, sr, pairs: Sequence[PromptPair], n: int, seed: int, options: SampleOptions, out_dir: str | Path,
    backend: str = DEFAULT_BACKEND, overwrite: bool = False, log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Sample every prompt of `pairs` with seeds seed .. seed + n - 1, measure, test; write OUT (see the module
    docstring) and return what controllability.json holds.

    base, sr: `medsyn.generation.run.LoadedRun`s (sr may be None). backend: the segmentation backend that
    re-segments each CT for the measures. overwrite, progress: as for `run_sampling`.
    """
    if n < 2:
        raise DataError(f"n={n}: expected at least 2 samples per prompt (a t-test needs 2 per side)")
    if not pairs:
        raise DataError("no prompt pairs given; expected at least one")
    out_dir = Path(out_dir)
    log = log or tqdm.write
    check_output_dir(out_dir, overwrite)
    segmenter = get_backend(backend)  # an unknown or missing backend fails before any sampling
    seeds = [seed + i for i in range(n)]
    prompts = list(dict.fromkeys(p for pair in pairs for p in (pair.a, pair.b)))
    for k, prompt in enumerate(prompts, 1):
        folder = out_dir / "samples" / prompt_id(prompt)
        log(f"prompt {k} of {len(prompts)} -> {folder}: {prompt}")
        run_sampling(base, sr, [(prompt, s) for s in seeds], options, folder, overwrite=overwrite, log=log,
                     progress=progress)  # fmt: skip

    values: dict[tuple[str, int], dict[str, Any]] = {}
    todo = [(p, i) for p in prompts for i in range(n)]
    for prompt, i in tqdm(
        todo, desc="measuring", unit="volume", disable=None if progress is None else not progress
    ):
        pid = prompt_id(prompt)
        sample = out_dir / "samples" / pid / str(i)
        values[prompt, i] = measure_sample(
            sample, out_dir / "measures" / pid / f"{i}.json", backend, segmenter
        )

    result = {
        "n": n, "seeds": seeds, "backend": backend, "alpha": ALPHA,
        "tests": "one-tailed in the prompted direction: Welch two-sample t-test (p) and paired t-test over the "
                 "shared seeds (p_paired)",
        "provenance": {
            "base": base.provenance(), "sr": sr.provenance() if sr is not None else None,
            "options": options.to_dict(), "device": str(base.model.device), "versions": package_versions(),
        },
        "pairs": [_pair_result(pair, seeds, values) for pair in pairs],
    }  # fmt: skip
    write_json(out_dir / "controllability.json", result)
    write_text(out_dir / "report.md", render_report(result))
    save_boxplots(out_dir / "boxplots.png", result)
    return result


def _pair_result(pair: PromptPair, seeds: list[int], values: Mapping[tuple[str, int], Mapping]) -> dict:
    sides = {"a": pair.a, "b": pair.b}
    entry: dict[str, Any] = {"name": pair.name, "prompts": sides, "seeds": seeds,
                             "folders": {s: f"samples/{prompt_id(p)}" for s, p in sides.items()}, "measures": []}  # fmt: skip
    for m in pair.measures:
        per_side = {
            side: [{"seed": s, "sample": f"samples/{prompt_id(prompt)}/{i}",
                    "value": measure_value(values[prompt, i], m.key)} for i, s in enumerate(seeds)]
            for side, prompt in sides.items()
        }  # fmt: skip
        st = pair_statistics(
            [v["value"] for v in per_side["a"]], [v["value"] for v in per_side["b"]], m.direction
        )
        significant = st["p"] is not None and st["p"] < ALPHA and st["in_direction"]
        entry["measures"].append({"measure": m.key, "direction": m.direction, **st, "significant": significant,
                                  "values": per_side})  # fmt: skip
    return entry


# --- report and plots ------------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def render_report(result: Mapping[str, Any]) -> str:
    """report.md: the table of the paper's Tables II-IV for every pair and measure, then prompts and notes."""
    prov = result["provenance"]
    options = prov["options"]
    seeds = result["seeds"]
    lines = [
        "# Controllability: does the model follow its report?",
        "",
        f"Base run `{prov['base']['run_dir']}`" + (f", SR run `{prov['sr']['run_dir']}`" if prov["sr"] else "")
        + f"; {result['n']} samples per prompt with seeds {seeds[0]}..{seeds[-1]} on both sides; sampler "
        f"{options['sampler']}, {options['steps']} steps"
        + (f" (+{options['sr_steps']} SR)" if prov["sr"] else "") + f", guidance {options['guidance']:g}.",
        "",
        f"Measured by the `{result['backend']}` segmentation backend (the CT re-segmented). p: one-tailed "
        "Welch two-sample t-test in the prompted direction (as the paper); paired p: one-tailed paired t-test "
        f"over the shared seeds. p < {result['alpha']:g} is the bar the project uses.",
        "",
        "| pair | measure | expected | A mean ± sd | B mean ± sd | effect (B − A) | p | paired p | seeds in "
        "direction | in direction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    notes = []
    for pair in result["pairs"]:
        for m in pair["measures"]:
            expected = "B > A" if m["direction"] == "greater" else "B < A"
            lines.append(
                f"| {pair['name']} | {m['measure']} | {expected} | {_num(m['mean_a'])} ± {_num(m['sd_a'])} | "
                f"{_num(m['mean_b'])} ± {_num(m['sd_b'])} | {_num(m['effect'])} | {_p(m['p'])} | "
                f"{_p(m['p_paired'])} | {m.get('seeds_in_direction', '')} of {m['n_paired']} | "
                f"{'yes' if m['in_direction'] else 'no'} |"
            )
            notes += [
                f"- {pair['name']}, {m['measure']}: {note}"
                for note in (m["p_note"], m["p_paired_note"])
                if note
            ]
    lines += ["", "## Prompts", ""]
    for pair in result["pairs"]:
        lines += [f"- **{pair['name']}**", f"  - A (`{pair['folders']['a']}`): {pair['prompts']['a']}",
                  f"  - B (`{pair['folders']['b']}`): {pair['prompts']['b']}"]  # fmt: skip
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def save_boxplots(path: str | Path, result: Mapping[str, Any]) -> None:
    """boxplots.png: one panel per pair and measure, A and B side by side, each seed's two values joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(pair, m) for pair in result["pairs"] for m in pair["measures"]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (pair, m) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        a = [v["value"] for v in m["values"]["a"]]
        b = [v["value"] for v in m["values"]["b"]]
        ax.boxplot([_finite(a), _finite(b)], positions=[0, 1], widths=0.5, showfliers=False)
        for va, vb in zip(a, b, strict=True):
            if va is not None and vb is not None:
                ax.plot([0, 1], [va, vb], color="0.6", linewidth=0.6, zorder=1)
        ax.scatter([0] * len(_finite(a)), _finite(a), s=10, color="tab:blue", zorder=2)
        ax.scatter([1] * len(_finite(b)), _finite(b), s=10, color="tab:red", zorder=2)
        ax.set_xticks([0, 1], ["A (without)", "B (with)"])
        arrow = ">" if m["direction"] == "greater" else "<"
        ax.set_title(f"{pair['name']}\nexpected B {arrow} A; p {_p(m['p'])}, paired p {_p(m['p_paired'])}",
                     fontsize=9)  # fmt: skip
        ax.set_ylabel(m["measure"])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
