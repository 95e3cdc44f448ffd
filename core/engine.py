"""The one scoring engine: any registered method's scores for test inputs over a training side.

Every method is ``score(z) = sum_p w_p * T_p . X_p(z)`` (:mod:`core.registry`). The engine forms
the test-side vectors T_p (one backward pass per point and representation, on the frozen-prefix
states of the test inputs: theta's bottom, or the point's own for an imported model's checkpoint),
applies the method's inverse Hessian (:mod:`core.inverses`), and asks
the training side (:mod:`core.training_sides`) for the inner products with X_p(z).
:meth:`Engine.scores_many` scores several methods at once and computes what they share - test
vectors, inverse-Hessian products, training passes - once.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ekfac import EkfacFactors
from .gradients import Basis, GradientCollector, Projector
from .inverses import InverseHessian, make_inverse
from .model import HiddenCache, compute_prefix, mask_span, predict, top_forward
from .points import LoadedModel, PointSet
from .registry import MethodSpec
from .representations import OUTPUTS, REPRESENTATIONS, LogitWeights, query_weights
from .scoring import ScoreSettings
from .training_sides import TrainingSide


@dataclass(frozen=True)
class TestInput:
    """The instance to explain: the pair (an empty aspect for a single text; a pair's first text in
    its place), the label to explain (None: the model's prediction), its span, its id when it is a
    dataset instance, and its gold label when known."""

    aspect: str
    text: str
    label: str | None = None
    span: tuple[int, int] | None = None
    id: str | None = None
    gold: str | None = None


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

    def rows(self, q: int, rep: str) -> list[int]:
        """Test q's rows for a representation: [input], or [input, masked copy] for a span one."""
        if not REPRESENTATIONS[rep].span:
            return [self.step * q]
        if not self.masked:
            raise ValueError("a span representation needs the span-masked copies of the test inputs")
        return [2 * q, 2 * q + 1]


@dataclass
class Scores:
    """Scores of every training instance for each test input, and how they were computed
    (``seconds``: this method's share of the wall time of the call that computed it)."""

    method: str
    values: torch.Tensor  # (Q, N)
    approx: dict
    seconds: float


@dataclass
class Plan:
    """The training side's work for some methods: per point, the distinct requests (training
    kind, test vectors with any inverse applied) and which request each method reads there."""

    requests: dict[str, dict]  # point -> {(training kind, test key): (training kind, (Q, d))}
    wanted: dict[str, list[tuple[MethodSpec, tuple]]]  # point -> [(method, its request)]
    approx: dict[str, dict]  # method -> how its scores are computed


class Engine:
    """Computes any method's scores for test inputs over one training side."""

    def __init__(self, loaded: LoadedModel, side: TrainingSide, projector: Projector, *,
                 points: PointSet | None = None,
                 train_cache: Callable[[], tuple[HiddenCache, torch.Tensor]] | None = None,
                 ekfac: Callable[[], EkfacFactors] | None = None):
        self.loaded, self.side, self.projector = loaded, side, projector
        self.points = points or loaded.point_set
        self.train_cache = train_cache  # loads (hidden states, labels) for LiSSA's Hessian-vector products
        self.ekfac = ekfac  # loads the EK-FAC factors
        self._inverses: dict[str, InverseHessian] = {}

    # test side ---------------------------------------------------------------------------
    def test_batch(self, tests: Sequence[TestInput], masked: bool = True, point: str = "final",
                   labels: torch.Tensor | None = None) -> TestBatch:
        """Frozen-prefix states of the test inputs on ``point``'s bottom (theta's unless it has its
        own), each followed by its span-masked copy when ``masked``, the labels to explain (given,
        or found at theta), and which tests' masks change no token."""
        if labels is None and self.loaded.bottom(point) != "final":
            labels = self.test_batch(tests, False).labels
        tok = self.loaded.tokenizer
        encs, spanless = [], []
        for q, t in enumerate(tests):
            e = self.loaded.encode(t.aspect, t.text)
            encs.append(e)
            if masked:
                encs.append(mask_span(e, t.span[0], t.span[1], tok.mask_token_id) if t.span else e)
                if encs[-1] == e:
                    spanless.append(q)
        with self.loaded.at(point) if self.loaded.bottom(point) != "final" else nullcontext():
            cache = compute_prefix(self.loaded.split, encs, tok.pad_token_id, device=self.loaded.device, progress=False)
        labels = self._labels(tests, cache, 2 if masked else 1) if labels is None else labels
        return TestBatch(cache, labels, masked, spanless)

    def _labels(self, tests: Sequence[TestInput], cache: HiddenCache, step: int) -> torch.Tensor:
        """The labels to explain; the prediction at theta where a test input names none."""
        labels = []
        for q, t in enumerate(tests):
            if t.label is not None:
                labels.append(self.loaded.labels.index(t.label))
            else:
                h, m = cache.batch([step * q], self.loaded.device)
                with torch.no_grad(), self.loaded.at("final"):
                    labels.append(int(self.loaded.split.top(inputs_embeds=h, attention_mask=m).logits.argmax()))
        return torch.tensor(labels)

    def test_vectors(self, tests: Sequence[TestInput] | None, point: str, rep: str, batch: TestBatch | None = None,
                     basis: Basis | None = None) -> torch.Tensor:
        """(Q, d) test-side vectors of a representation at a point: g(z') or e(z') (of ``tests``,
        or of the tests of ``batch``), in the coordinates ``basis`` gives when ``rep`` has its own
        (the EK-FAC inverse's: rotated and divided).

        e(z') is one gradient of out(z') - out(z'_-kl) per test (the two inputs' tokens side by
        side), not two gradients subtracted."""
        representation = REPRESENTATIONS[rep]
        if (representation.basis is None) != (basis is None):
            raise ValueError(f"{rep!r} test vectors are formed in {representation.basis or 'the parameters'!r} "
                             "coordinates; give that basis, and only that one")
        span = representation.span
        batch = batch or self.test_batch(tests, masked=span, point=point)
        rows = [r for q in range(len(batch.labels)) for r in batch.rows(q, rep)]
        h, m = batch.cache.batch(rows, self.loaded.device)
        with self.loaded.at(point), GradientCollector(self.loaded.split, self.projector) as col:
            (g,), _, _ = col.gradients(h, m, [query_weights(representation, batch.labels)], groups=2 if span else 1,
                                       bases=[basis])
        if span:  # a mask that changes nothing: e(z') = 0 exactly (the copies cancel only to rounding)
            g[batch.spanless] = 0.0
        return g.detach()

    @torch.no_grad()
    def test_embeddings(self, tests: Sequence[TestInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embeddings at theta of each test input and of its span-masked version (Q, H) x 2."""
        batch = self.test_batch(tests)
        with self.loaded.at("final"):
            _, cls = predict(self.loaded.split, batch.cache, device=self.loaded.device, with_cls=True)
        return cls[0::2], cls[1::2]

    def test_output(self, batch: TestBatch, q: int, rep: str) -> tuple[torch.Tensor, torch.Tensor, LogitWeights]:
        """Test q's rows of ``rep`` (the input, and its span-masked copy for a span
        representation): their prefix states, mask, and the logit weights whose backward pass
        over those rows gives q's test-side gradient (the masked row's negated)."""
        rows = batch.rows(q, rep)
        h, m = batch.cache.batch(rows, self.loaded.device)
        output = OUTPUTS[REPRESENTATIONS[rep].output](batch.labels[[q] * len(rows)].to(self.loaded.device))
        signs = torch.tensor([1.0, -1.0][: len(rows)], device=self.loaded.device)
        return h, m, lambda logits: output(logits) * signs.to(logits.dtype)[:, None]

    def dense_test_gradient(self, batch: TestBatch, q: int, rep: str) -> dict[str, torch.Tensor]:
        """Test q's unprojected test-side vector (for LiSSA) with the model as it is (at theta)."""
        params = self.loaded.split.top_params()
        h, m, weights = self.test_output(batch, q, rep)
        logits = top_forward(self.loaded.split, h, m)
        value = (weights(logits.detach()) * logits).sum()  # d(value)/d(logits) = the weights
        grads = torch.autograd.grad(value, list(params.values()))
        return {n: g.detach() for n, g in zip(params, grads)}

    # scores ------------------------------------------------------------------------------
    def inverse(self, spec: MethodSpec, settings: ScoreSettings) -> InverseHessian:
        """The method's inverse-Hessian strategy under ``settings`` (made once per key)."""
        key = json.dumps(settings.inverse_key(spec), sort_keys=True)
        if key not in self._inverses:
            self._inverses[key] = make_inverse(spec.inverse, settings, self)
        return self._inverses[key]

    def scores(self, tests: Sequence[TestInput], spec: MethodSpec, settings: ScoreSettings = ScoreSettings()) -> Scores:
        """Scores (Q, N) of one method for ``tests``."""
        return self.scores_many(tests, [spec], settings)[spec.name]

    def scores_many(self, tests: Sequence[TestInput], specs: Sequence[MethodSpec],
                    settings: ScoreSettings = ScoreSettings()) -> dict[str, Scores]:
        """Scores of several methods, computing each shared test vector, inverse-Hessian product
        and training pass once: per point, one request per distinct (training kind, test vector)."""
        started = time.perf_counter()
        plan = self.plan(tests, specs, settings)
        totals: dict[str, torch.Tensor] = {}
        for point, requests in plan.requests.items():
            dots = self.side.dot_many(point, requests)
            for s, request in plan.wanted[point]:
                part = self.points.weight(s.weights, point, s.points) * dots[request]
                totals[s.name] = part if s.name not in totals else totals[s.name] + part
        share = (time.perf_counter() - started) / len(specs)
        return {s.name: Scores(s.name, settings.sign(s) * totals[s.name], plan.approx[s.name], share) for s in specs}

    def plan(self, tests: Sequence[TestInput], specs: Sequence[MethodSpec], settings: ScoreSettings) -> Plan:
        """What scoring ``specs`` asks of the training side, with the test side computed: per
        point, the distinct requests and the one each method reads."""
        batches = {"final": self.test_batch(tests, masked=any(s.test_span for s in specs))}
        approx = {s.name: {"projection": self.projector.describe(), "exact": self.side.exact,
                           "points": self.points.of(s.points, s.name), "paper_signs": settings.paper_signs}
                  for s in specs}
        by_point: dict[str, list[MethodSpec]] = {}
        for s in specs:
            for point in self.points.of(s.points, s.name):
                by_point.setdefault(point, []).append(s)
        plan = Plan({}, {}, approx)
        for point, group in by_point.items():
            bottom = self.loaded.bottom(point)  # an imported model's checkpoint runs on its own bottom
            if bottom not in batches:
                theta = batches["final"]
                batches[bottom] = self.test_batch(tests, theta.masked, bottom, theta.labels)
            wanted, plan.requests[point] = self._requests(tests, batches[bottom], point, group, settings, approx)
            plan.wanted[point] = [(s, wanted[s.name]) for s in group]
        return plan

    def terms(self, tests: Sequence[TestInput], spec: MethodSpec,
              settings: ScoreSettings = ScoreSettings()) -> tuple[dict[tuple[str, str], torch.Tensor], dict[tuple[str, str], float], dict]:
        """One method as a sum of (point, training kind) terms, for a search over the index's rows
        (:mod:`core.ann`): each term's test vectors (Q, d), its weight (the sign included), and
        how the vectors were computed. The scores are sum_t weight_t * rows_t . vectors_t."""
        plan = self.plan(tests, [spec], settings)
        vectors, weights = {}, {}
        for point, chosen in plan.wanted.items():
            for s, request in chosen:
                vectors[point, request[0]] = plan.requests[point][request][1]
                weights[point, request[0]] = settings.sign(s) * self.points.weight(s.weights, point, s.points)
        return vectors, weights, plan.approx[spec.name]

    def _requests(self, tests: Sequence[TestInput], batch: TestBatch, point: str, group: list[MethodSpec],
                  settings: ScoreSettings, approx: dict[str, dict]) -> tuple[dict[str, tuple], dict]:
        """The training side's requests at one point: each method's (training kind, test-vector
        key), and per distinct request its test vectors, the inverse applied where asked."""
        raw: dict[str, torch.Tensor] = {}
        ready: dict[tuple[str, str], tuple[torch.Tensor, dict | None]] = {}
        wanted: dict[str, tuple] = {}
        for s in group:
            key = (s.test, json.dumps(settings.inverse_key(s), sort_keys=True))
            if key not in ready:
                inverse = self.inverse(s, settings) if s.inverse else None
                if (inverse is None or inverse.reads_vectors) and s.test not in raw:
                    raw[s.test] = self.test_vectors(tests, point, s.test, batch)
                ready[key] = (inverse.apply(self, batch, point, s.test, raw.get(s.test)) if inverse
                              else (raw[s.test], None))
            if s.inverse:
                approx[s.name]["ihvp"] = ready[key][1]
            wanted[s.name] = (s.train, key)
        requests = {req: (req[0], ready[req[1]][0]) for req in dict.fromkeys(wanted.values())}
        return wanted, requests
