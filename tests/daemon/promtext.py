"""A strict parser of Prometheus's text exposition format 0.0.4, for the tests: any line
that breaks the format, a sample before its family's TYPE, a family split in two, a repeated
sample, or a histogram whose buckets are not cumulative or do not end at +Inf = _count is
an error."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


class FormatError(ValueError):
    pass


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, suffix: str = "", **labels: str) -> float:
        key = (self.name + suffix, tuple(sorted((k, str(v)) for k, v in labels.items())))
        return self.samples[key]


def _value(text: str, line: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise FormatError(f"bad value {text!r} in {line!r}")
    return float(text)


def _labels(text: str, line: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        m = LABEL.match(text, i)
        if not m or text[m.end():m.end() + 2] != '="':
            raise FormatError(f"bad label at {text[i:]!r} in {line!r}")
        name, i = m.group(), m.end() + 2
        val = []
        while True:
            if i >= len(text):
                raise FormatError(f"unterminated label value in {line!r}")
            c = text[i]
            if c == "\\":
                nxt = text[i + 1:i + 2]
                if nxt not in ("\\", '"', "n"):
                    raise FormatError(f"bad escape in {line!r}")
                val.append("\n" if nxt == "n" else nxt)
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                val.append(c)
                i += 1
        if name in dict(out):
            raise FormatError(f"label {name} twice in {line!r}")
        out.append((name, "".join(val)))
        if i < len(text):
            if text[i] != ",":
                raise FormatError(f"expected ',' in {line!r}")
            i += 1
    return tuple(sorted(out))


def _family_of(sample: str, families: dict[str, Family]) -> Family | None:
    if sample in families:
        return families[sample]
    for fam in families.values():
        for suffix in SUFFIXES.get(fam.type, ()):
            if suffix and sample == fam.name + suffix:
                return fam
    return None


def parse(text: str) -> dict[str, Family]:
    if not text.endswith("\n"):
        raise FormatError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    done: set[str] = set()
    current: Family | None = None
    for line in text.split("\n")[:-1]:
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.fullmatch(name):
                    raise FormatError(f"bad metric name in {line!r}")
                fam = families.get(name)
                if fam is None:
                    if name in done:
                        raise FormatError(f"family {name} split")
                    fam = families[name] = Family(name)
                if current is not None and current is not fam:
                    done.add(current.name)
                if fam.samples:
                    raise FormatError(f"{parts[1]} for {name} after its samples")
                if parts[1] == "TYPE":
                    if len(parts) != 4 or parts[3] not in TYPES or fam.type != "untyped":
                        raise FormatError(f"bad or repeated TYPE: {line!r}")
                    fam.type = parts[3]
                else:
                    if fam.help is not None:
                        raise FormatError(f"repeated HELP: {line!r}")
                    fam.help = parts[3] if len(parts) == 4 else ""
                current = fam
            continue
        m = NAME.match(line)
        if not m:
            raise FormatError(f"bad line {line!r}")
        sample, rest = m.group(), line[m.end():]
        labels: tuple = ()
        if rest.startswith("{"):
            end = rest.rfind("}")
            if end < 0:
                raise FormatError(f"unterminated labels in {line!r}")
            labels, rest = _labels(rest[1:end], line), rest[end + 1:]
        if not rest.startswith(" "):
            raise FormatError(f"no value in {line!r}")
        fields = rest.split()
        if len(fields) not in (1, 2):
            raise FormatError(f"bad value part in {line!r}")
        value = _value(fields[0], line)
        fam = _family_of(sample, families)
        if fam is None:
            raise FormatError(f"sample {sample} before its TYPE")
        if fam is not current:
            raise FormatError(f"samples of {fam.name} are not together")
        key = (sample, labels)
        if key in fam.samples:
            raise FormatError(f"repeated sample {line!r}")
        fam.samples[key] = value
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
        if fam.type == "counter":
            for key, v in fam.samples.items():
                if v < 0 or math.isnan(v):
                    raise FormatError(f"counter {key} is {v}")
    return families


def _check_histogram(fam: Family) -> None:
    series: dict[tuple, list[tuple[float, float]]] = {}
    for (sample, labels), v in fam.samples.items():
        if sample == fam.name + "_bucket":
            d = dict(labels)
            if "le" not in d:
                raise FormatError(f"bucket without le in {fam.name}")
            le = _value(d.pop("le"), fam.name)
            series.setdefault(tuple(sorted(d.items())), []).append((le, v))
    for labels, buckets in series.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        if counts != sorted(counts) or buckets[-1][0] != math.inf:
            raise FormatError(f"buckets of {fam.name}{labels} are not cumulative up to +Inf")
        if fam.samples.get((fam.name + "_count", labels)) != counts[-1]:
            raise FormatError(f"{fam.name}{labels}: _count differs from the +Inf bucket")
        if (fam.name + "_sum", labels) not in fam.samples:
            raise FormatError(f"{fam.name}{labels} has no _sum")
