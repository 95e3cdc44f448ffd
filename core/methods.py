"""The eight methods as descriptions over one inner-product engine.

Every method is ``score(z) = sum_p w_p * T_p . X_p(z)``: a test-side vector T_p and a
training-side vector X_p(z) at each parameter point p. Methods differ only in

* which points are summed: ``final`` (theta), ``checkpoints`` (weighted by their learning rates
  eta_c), or ``variants`` (theta + delta_i);
* which gradients make each side: ``full`` = g(z) (training) or g(z') (test); ``diff`` = the
  span's part of the gradient, e(z) = g(z) - g(z_-ij) and e(z') = g(z') - g(z'_-kl);
* whether the test side is multiplied by the inverse Hessian (the IF family).

Larger score = stronger proponent for every method. Two of the paper's formulas rank the other
way round when read as "larger = proponent": Eq. 1 puts a minus sign on IF, and IF++/TracIn++
(and so GroundTruth) put the test side as g(z'_-kl) - g(z') = -e(z'). Measured on MAMS (20 test
instances, default backbone), the literal TracIn++ ranked descending gives Lag@10 3.5% against
36% for a random ranking - its top are opponents - and the reversed order 64%. So SpanLens uses
e(z') on the test side; ``paper_signs=True`` applies the paper's literal signs to every method
whose formula differs (IF, and the methods with a span on the test side).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from .gradients import GradientCollector, Projector, loss_weights
from .ihvp import DEFAULT_DAMPING, DampedInverse, LissaResult, LissaSettings, lissa
from .index import GradientIndex, LoadedModel, gauss_newton_batch, training_gradients
from .model import HiddenCache, compute_prefix, length_batches, mask_span, predict, top_forward


@dataclass(frozen=True)
class Method:
    """One explanation method as a point set, two sides and an optional inverse Hessian."""

    name: str
    points: str  # "final" | "checkpoints" | "variants"
    train: str  # "full" | "diff"
    test: str  # "full" | "diff"
    inverse: bool = False
    weighted: bool = False  # checkpoint learning rates as weights (TracIn)
    uses_spans: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uses_spans", "diff" in (self.train, self.test))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("IF", "final", "full", "full", inverse=True),
        Method("IF+", "final", "diff", "full", inverse=True),
        Method("IF++", "final", "diff", "diff", inverse=True),
        Method("TracIn", "checkpoints", "full", "full", weighted=True),
        Method("TracInF", "variants", "full", "full"),
        Method("TracIn+", "variants", "diff", "full"),
        Method("TracIn++", "variants", "diff", "diff"),
        Method("GroundTruth", "final", "diff", "diff"),
    )
}
# TracIn++ with checkpoints in place of variants: the paper's "Control" (table 4).
CONTROL = Method("Control", "checkpoints", "diff", "diff")
PAPER_METHODS = ("IF", "IF+", "IF++", "TracInF", "TracIn+", "TracIn++")


def paper_sign(method: Method) -> int:
    """-1 where the paper's literal formula is the negative of ours (IF; test-side spans)."""
    return -1 if method.name == "IF" or method.test == "diff" else 1


def resolve_method(name: str) -> Method:
    """A method by name, case-insensitively (``gt``/``ground-truth`` for GroundTruth)."""
    table = {m.lower(): m for m in [*METHODS, CONTROL.name]}
    table.update({"gt": "GroundTruth", "ground-truth": "GroundTruth", "groundtruth": "GroundTruth"})
    key = table.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join([*METHODS, CONTROL.name])}")
    return CONTROL if key == CONTROL.name else METHODS[key]


@dataclass(frozen=True)
class TestInput:
    """The instance to explain: the pair, its gold label when known, and its span."""

    aspect: str
    text: str
    label: str | None = None
    span: tuple[int, int] | None = None
    id: str | None = None


class TrainingSide:
    """Training-side vectors: from the index (projected) or streamed exactly (no projection)."""

    def __init__(self, loaded: LoadedModel, projector: Projector, index: GradientIndex | None = None,
                 full: HiddenCache | None = None, masked: HiddenCache | None = None,
                 labels: torch.Tensor | None = None, batch_size: int = 32):
        self.loaded, self.projector, self.index = loaded, projector, index
        self.full, self.masked, self.labels, self.batch_size = full, masked, labels, batch_size
        self._gram: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.index is None

    def dot(self, point: str, kind: str, vecs: torch.Tensor) -> torch.Tensor:
        """(Q, N) inner products of test vectors (Q, d) with every training vector."""
        if self.index is not None:
            return vecs.float() @ self.index.matrix(point, kind).T
        return self._stream(point, kind, vecs)

    def _stream(self, point: str, kind: str, vecs: torch.Tensor) -> torch.Tensor:
        assert self.full is not None and self.masked is not None and self.labels is not None
        out = torch.zeros(vecs.shape[0], len(self.full), dtype=torch.float64)
        vecs = vecs.double().cpu()
        batches = length_batches(self.full.lengths(), self.batch_size)
        for batch in training_gradients(self.loaded, self.projector, self.full, self.masked, self.labels, point, batches):
            rows = batch.full if kind == "full" else batch.diff
            out[:, batch.rows] = vecs @ rows.double().T
        return out.float()

    def gram(self) -> torch.Tensor:
        """The mean Gauss-Newton matrix at theta in this side's space."""
        if self._gram is None:
            self._gram = self.index.gauss_newton() if self.index is not None else self._exact_gram()
        return self._gram

    def _exact_gram(self, limit: int = 20_000) -> torch.Tensor:
        d = self.projector.dim
        if d > limit:
            raise ValueError(f"an exact inverse over {d} parameters is out of reach; use the LiSSA inverse (--ihvp lissa)")
        gram = torch.zeros(d, d, dtype=torch.float64)
        batches = length_batches(self.full.lengths(), self.batch_size)
        for batch in training_gradients(self.loaded, self.projector, self.full, self.masked, self.labels, "final",
                                        batches, with_jacobian=True):
            gram += gauss_newton_batch(batch.logits, batch.jacobian)
        return gram / len(self.full)


class TestBatch(NamedTuple):
    """Frozen-prefix states of test inputs: row q, or rows 2q and 2q + 1 (the input and its
    span-masked copy) when ``masked``; ``spanless``: tests whose mask changes no token."""

    cache: HiddenCache
    labels: torch.Tensor
    masked: bool
    spanless: list[int]

    @property
    def step(self) -> int:
        """Rows per test."""
        return 2 if self.masked else 1

    def rows(self, q: int, kind: str) -> list[int]:
        """Test q's rows for a test side: [input] for g(z'), [input, masked copy] for e(z')."""
        if kind == "full":
            return [self.step * q]
        if not self.masked:
            raise ValueError("e(z') needs the span-masked copies of the test inputs")
        return [2 * q, 2 * q + 1]


@dataclass
class Scores:
    """Scores of every training instance for each test input, and how they were computed."""

    method: str
    values: torch.Tensor  # (Q, N)
    approx: dict
    seconds: float


class Engine:
    """Computes any method's scores for test inputs over one training side."""

    def __init__(self, loaded: LoadedModel, side: TrainingSide, checkpoint_lrs: dict[str, float]):
        self.loaded = loaded
        self.side = side
        self.projector = side.projector
        self.checkpoint_lrs = checkpoint_lrs
        self._inverse: dict[float, DampedInverse] = {}

    def point_names(self, method: Method) -> list[str]:
        names = list(self.loaded.points)
        if method.points == "final":
            return ["final"]
        chosen = [p for p in names if p.startswith(method.points[:-1] + "-")]
        if not chosen:
            raise ValueError(f"{method.name} needs {method.points}, and this workspace has none")
        return chosen

    # test side ---------------------------------------------------------------------------
    def _test_caches(self, tests: list[TestInput], masked: bool = True) -> TestBatch:
        """Frozen-prefix states of the test inputs, each followed by its span-masked copy when
        ``masked``, their labels, and which tests' masks change no token."""
        tok = self.loaded.tokenizer
        encs, spanless = [], []
        for q, t in enumerate(tests):
            e = self.loaded.encode(t.aspect, t.text)
            encs.append(e)
            if masked:
                encs.append(mask_span(e, t.span[0], t.span[1], tok.mask_token_id) if t.span else e)
                if encs[-1] == e:
                    spanless.append(q)
        cache = compute_prefix(self.loaded.split, encs, tok.pad_token_id, device=self.loaded.device, progress=False)
        return TestBatch(cache, self._labels(tests, cache, 2 if masked else 1), masked, spanless)

    def _labels(self, tests: list[TestInput], cache: HiddenCache, step: int) -> torch.Tensor:
        """Gold labels; the prediction at theta where a test input has none (row ``step * q``)."""
        labels = []
        for q, t in enumerate(tests):
            if t.label is not None:
                labels.append(self.loaded.labels.index(t.label))
            else:
                h, m = cache.batch([step * q])
                with torch.no_grad(), self.loaded.at("final"):
                    labels.append(int(self.loaded.split.top(inputs_embeds=h.to(self.loaded.device), attention_mask=m.to(self.loaded.device)).logits.argmax()))
        return torch.tensor(labels)

    def test_vectors(self, tests: list[TestInput], point: str, kind: str, batch: TestBatch | None = None) -> torch.Tensor:
        """(Q, d) test-side vectors at a point: g(z') or e(z') = g(z') - g(z'_-kl).

        e(z') is one gradient of loss(z') - loss(z'_-kl) per test (the two inputs' tokens side
        by side), not two gradients subtracted; g(z') uses the whole inputs alone."""
        batch = batch or self._test_caches(tests, masked=kind == "diff")
        rows = [r for q in range(len(tests)) for r in batch.rows(q, kind)]
        h, m = batch.cache.batch(rows, self.loaded.device)
        weights = loss_weights(batch.labels) if kind == "full" else _span_loss_weights(batch.labels)
        with self.loaded.at(point), GradientCollector(self.loaded.split, self.projector) as col:
            (g,), _, _ = col.gradients(h, m, [weights], groups=1 if kind == "full" else 2)
        if kind == "diff":  # a mask that changes nothing: e(z') = 0 exactly (the copies cancel only to rounding)
            g[batch.spanless] = 0.0
        return g.detach()

    @torch.no_grad()
    def test_embeddings(self, tests: list[TestInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embeddings at theta of each test input and of its span-masked version (Q, H) x 2."""
        batch = self._test_caches(tests)
        with self.loaded.at("final"):
            _, cls = predict(self.loaded.split, batch.cache, device=self.loaded.device, with_cls=True)
        return cls[0::2], cls[1::2]

    # scores ------------------------------------------------------------------------------
    def inverse(self, damping: float = DEFAULT_DAMPING) -> DampedInverse:
        if damping not in self._inverse:
            self._inverse[damping] = DampedInverse(self.side.gram(), damping)
        return self._inverse[damping]

    def scores(
        self,
        tests: list[TestInput],
        method: Method,
        *,
        ihvp: str = "fast",
        damping: float = DEFAULT_DAMPING,
        lissa_settings: LissaSettings = LissaSettings(),
        paper_signs: bool = False,
        train_cache: tuple[HiddenCache, torch.Tensor] | None = None,
    ) -> Scores:
        """Scores (Q, N) of ``method`` for ``tests``; ``train_cache`` (hidden states, labels) is
        needed for LiSSA's Hessian-vector products."""
        started = time.perf_counter()
        batch = self._test_caches(tests, masked=method.test == "diff")
        approx: dict = {"projection": self.projector.describe(), "exact": self.side.exact, "points": self.point_names(method)}
        total = None
        for point in self.point_names(method):
            vecs = self.test_vectors(tests, point, method.test, batch)
            if method.inverse:
                vecs, approx["ihvp"] = self._apply_inverse(tests, method, vecs, ihvp, damping, lissa_settings, train_cache, batch)
            weight = self.checkpoint_lrs.get(point, 1.0) if method.weighted else 1.0
            part = weight * self.side.dot(point, method.train, vecs)
            total = part if total is None else total + part
        if paper_signs and paper_sign(method) < 0:
            total = -total
        approx["paper_signs"] = paper_signs
        return Scores(method.name, total, approx, time.perf_counter() - started)

    def _apply_inverse(self, tests, method, vecs, ihvp, damping, settings, train_cache, batch: TestBatch):
        if ihvp == "fast":
            inv = self.inverse(damping)
            return inv.solve(vecs.double().cpu()).float(), inv.describe()
        if ihvp != "lissa":
            raise ValueError(f"ihvp must be 'fast' or 'lissa', got {ihvp!r}")
        if train_cache is None:
            raise ValueError("LiSSA needs the training cache (hidden states and labels)")
        out, info = [], []
        self.loaded.use("final")  # LiSSA's Hessian-vector products run on the model itself, at theta
        for q in range(len(tests)):
            if method.test == "diff" and q in batch.spanless:  # e(z') = 0: so is its inverse
                out.append(torch.zeros(self.projector.dim))
                info.append(LissaResult({}, lam=settings.lam, converged=True).describe() | {"trace": [], "skipped": "the span masks no token"})
                continue
            dense = self.dense_test_gradient(batch, q, method.test)
            res = lissa(self.loaded.split, train_cache[0], train_cache[1], dense, settings, device=self.loaded.device)
            out.append(self.projector.project_params(res.vector))
            info.append(res.describe() | {"trace": res.trace})
        return torch.stack(out).float(), info[0] if len(info) == 1 else {"mode": "lissa", "runs": info}

    def dense_test_gradient(self, batch: TestBatch, q: int, kind: str) -> dict[str, torch.Tensor]:
        """Test q's unprojected test-side vector (for LiSSA) with the model as it is (at theta)."""
        params = self.loaded.split.top_params()
        rows = batch.rows(q, kind)
        h, m = batch.cache.batch(rows, self.loaded.device)
        losses = torch.nn.functional.cross_entropy(top_forward(self.loaded.split, h, m),
                                                   batch.labels[[q] * len(rows)].to(self.loaded.device), reduction="none")
        loss = losses[0] if kind == "full" else losses[0] - losses[1]
        grads = torch.autograd.grad(loss, list(params.values()))
        return {n: g.detach() for n, g in zip(params, grads)}


def _span_loss_weights(labels: torch.Tensor):
    """Logit weights of loss(z') - loss(z'_-kl) over rows (z', z'_-kl) of each test."""
    base = loss_weights(labels.repeat_interleave(2))

    def weights(logits: torch.Tensor) -> torch.Tensor:
        signs = torch.tensor([1.0, -1.0], dtype=logits.dtype, device=logits.device).repeat(len(labels))
        return base(logits) * signs[:, None]

    return weights


@dataclass
class Hit:
    rank: int
    train_id: str
    score: float


@dataclass
class Explanation:
    """One method's answer for one test input."""

    method: str
    test_id: str | None
    test_span: tuple[int, int] | None
    k: int
    top: list[Hit]
    opponents: list[Hit]
    scores: list[float]
    approx: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        data = dict(data)
        data["top"] = [Hit(**h) for h in data["top"]]
        data["opponents"] = [Hit(**h) for h in data["opponents"]]
        data["test_span"] = tuple(data["test_span"]) if data["test_span"] else None
        return cls(**data)


def rank(scores: torch.Tensor, ids: list[str], k: int, *, opponents: bool = False) -> list[Hit]:
    """Top-k training ids by score (descending), or the k most negative (ascending)."""
    k = min(k, len(ids))
    values, idx = torch.topk(scores.double(), k, largest=not opponents)
    return [Hit(r + 1, ids[int(i)], float(v)) for r, (v, i) in enumerate(zip(values, idx))]
