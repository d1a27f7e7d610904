"""Stage 2: Spec + ModuleGraph -> Plan. Every check happens here, before any tensor changes.

Per statement: resolve the method in the registry, validate its parameters, match its patterns
against the module graph (real paths and role paths), check each target's kind and shape. Across
statements: build the rewrite graph (networkx) with an edge wherever one rewrite must precede another
on the same module, reject conflicts, untold ties and cycles; its topological order is the apply order.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import networkx as nx
from pydantic import BaseModel, ConfigDict, ValidationError

from surgeon.errors import Location, PlanError, SpecError, did_you_mean
from surgeon.graph import ModuleGraph, ModuleInfo
from surgeon.methods.base import Method, MethodParams, Target, WordArgs, WordError, registry
from surgeon.patterns import PatternError, compile_pattern
from surgeon.peft_names import peft_hint
from surgeon.spec import Clause, Param, Spec, Statement, Word


def tensor_key(path: str, label: str | None, local: str) -> str:
    """The run's name for a tensor a rewrite adds: `path.local`, or `path[NAME].local` for a named
    adapter, so several adapters on one module keep their tensors apart."""
    return f"{path}[{label}].{local}" if label else f"{path}.{local}"


class Rewrite(BaseModel):
    model_config = ConfigDict(frozen=True)
    statement: int  # index of the statement in the spec
    verb: str
    method: str
    params: dict[str, Any]
    target: Target
    added: dict[str, tuple[int, ...]]
    location: Location
    trained: dict[str, tuple[int, ...]] = {}  # the target's own parameters made trainable
    trained_tensors: dict[str, str] = {}  # their names in the model (one name for a tied tensor)
    label: str | None = None
    bytes_before: int = 0  # the target's own tensors, before and after (quantization shrinks them)
    bytes_after: int = 0

    def key(self, local: str) -> str:
        """The run's name for one of this rewrite's tensors (`tensor_key`)."""
        return tensor_key(self.target.path, self.label, local)

    @property
    def added_count(self) -> int:
        return sum(math.prod(shape) for shape in self.added.values())

    @property
    def trained_count(self) -> int:
        return sum(math.prod(shape) for shape in self.trained.values())


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)
    spec: Spec
    rewrites: tuple[Rewrite, ...]  # in apply order
    base_parameters: int
    base_bytes: int

    @property
    def added_parameters(self) -> int:
        return sum(r.added_count for r in self.rewrites)

    @property
    def trainable_parameters(self) -> int:
        """Added parameters plus the base parameters made trainable (each counted once)."""
        trained = {r.trained_tensors.get(name, f"{r.target.path}.{name}"): math.prod(shape)
                   for r in self.rewrites for name, shape in r.trained.items()}
        return self.added_parameters + sum(trained.values())


@dataclass(frozen=True)
class LivePatch:
    """A patch of an earlier job still live on the model being planned: a new spec stacks on it
    where its method allows (`stacks_on`) and is refused with the reason elsewhere."""

    path: str
    verb: str
    method: str
    statement: str  # the spec line that made it, for messages
    label: str | None = None
    claims: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rewrite: Rewrite, spec: Spec) -> LivePatch:
        lines = spec.text.split("\n")  # lines as Lark counts them (see SpecError.render)
        line = lines[rewrite.location.line - 1].strip() if 0 < rewrite.location.line <= len(lines) else ""
        return cls(rewrite.target.path, rewrite.verb, rewrite.method, line or f"{rewrite.verb} {rewrite.method}",
                   rewrite.label, claims_of(rewrite))


def method_of(rewrite: Rewrite | LivePatch) -> type[Method]:
    return registry()[(rewrite.verb, rewrite.method)]


def params_of(rewrite: Rewrite) -> MethodParams:
    return method_of(rewrite).Params(**rewrite.params)


def claims_of(rewrite: Rewrite) -> frozenset[str]:
    return method_of(rewrite).claims_of(params_of(rewrite))


def _claim_conflict(new_claims: frozenset[str], old_claims: frozenset[str]) -> str | None:
    """Why two statements cannot compose: both take over one model-wide thing, or None."""
    shared = sorted(new_claims & old_claims)
    return f"both change the model's {_CLAIMS.get(shared[0], shared[0])}" if shared else None


class _Planner:
    def __init__(self, spec: Spec, graph: ModuleGraph, live: Sequence[LivePatch] = ()) -> None:
        self.spec, self.graph, self.live = spec, graph, tuple(live)
        self.candidates = list(graph.candidates())
        self.done: list[Rewrite] = []  # the rewrites of the statements planned so far

    def error(self, message: str, location: Location | None, hint: str | None = None) -> SpecError:
        return SpecError(message, source=self.spec.source, text=self.spec.text, location=location, hint=hint)

    def resolve(self, statement: Statement) -> tuple[type[Method], tuple[Word, ...]]:
        """The method a statement names, and the words after its name. A method registered under
        its verb alone (`quantize`) takes every word after the verb."""
        methods = registry()
        verbs = {verb for verb, _ in methods}
        verb = statement.verb.text
        if verb not in verbs:
            raise self.error(f"unknown verb '{verb}'", statement.verb.location,
                             did_you_mean(verb, verbs) or "verbs: " + ", ".join(sorted(verbs)))
        words = statement.words
        if words and (verb, words[0].text) in methods:
            return methods[(verb, words[0].text)], words[1:]
        if (verb, verb) in methods:
            return methods[(verb, verb)], words
        names = [name for v, name in methods if v == verb]
        if not words:
            raise self.error(f"'{verb}' needs a method name", statement.verb.location, "methods: " + ", ".join(sorted(names)))
        raise self.error(f"unknown method '{verb} {words[0].text}'", words[0].location,
                         did_you_mean(words[0].text, names) or "methods: " + ", ".join(sorted(names)))

    def read_words(self, method: type[Method], words: tuple[Word, ...], statement: Statement) -> WordArgs:
        try:
            return method.read_words(words)
        except WordError as problem:
            raise self.error(str(problem), problem.word.location, problem.hint) from None
        except PlanError as problem:
            raise self.error(str(problem), statement.location) from None

    def validate(self, method: type[Method], statement: Statement, from_words: dict[str, Any]) -> MethodParams:
        by_key: dict[str, Param] = {}
        for param in statement.params:
            if param.key in by_key or param.key in from_words:
                raise self.error(f"parameter '{param.key}' is given twice", param.location)
            by_key[param.key] = param
        try:
            return method.Params(**from_words, **{k: p.value for k, p in by_key.items()})
        except ValidationError as err:
            # an unknown key first: `rank=8` beside a missing total_steps is most likely the cause of both
            problem = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
            key = str(problem["loc"][0]) if problem["loc"] else ""
            location = by_key[key].location if key in by_key else statement.location
            if problem["type"] == "extra_forbidden":
                known = list(method.Params.model_fields)
                hint = peft_hint(method, key, statement) or did_you_mean(key, known)
                raise self.error(f"unknown parameter '{key}' for {method.name}", location,
                                 hint or "parameters: " + ", ".join(known)) from None
            if problem["type"] == "missing":
                field = method.Params.model_fields.get(key)
                description = field.description if field is not None else None
                raise self.error(f"{method.name} needs parameter '{key}'", statement.location,
                                 f"{key}=...: {description}" if description else None) from None
            value = by_key[key].value if key in by_key else None
            choices = get_args(method.Params.model_fields[key].annotation) if key in method.Params.model_fields else ()
            hint = did_you_mean(str(value), [str(c) for c in choices]) if problem["type"] == "literal_error" else None
            raise self.error(f"bad value {value!r} for '{key}': {problem['msg']}", location, hint) from None

    def match(self, clause: Clause) -> dict[str, set[str | None]]:
        try:
            pattern = compile_pattern(clause.pattern)
        except PatternError as err:
            column = clause.location.column + len(clause.preposition) + 1 + err.offset
            raise self.error(f"bad pattern: {err}", Location(line=clause.location.line, column=column)) from None
        found: dict[str, set[str | None]] = {}
        for name, path, slice_name in self.candidates:
            if pattern.matches(name):
                found.setdefault(path, set()).add(slice_name)
        return found

    def nearest(self, pattern: str) -> str | None:
        tail = pattern.split(".")[-2:]
        keys = {".".join(name.split(".")[-len(tail):]) for name, _, _ in self.candidates if name}
        close = difflib.get_close_matches(".".join(tail), sorted(keys), n=3, cutoff=0.5)
        return "nearest module names: " + ", ".join(close) if close else None

    def targets(self, method: type[Method], statement: Statement,
                args: WordArgs) -> tuple[dict[str, set[str | None]], bool, dict[str, str]]:
        """The matched module paths (with the slices matched), whether the match is lenient, and
        the preposition that named each path (`after *.mlp`)."""
        allowed = method.prepositions | {"except"}
        for clause in statement.clauses:
            if clause.preposition not in allowed:
                raise self.error(f"{method.name} does not take '{clause.preposition}'", clause.location,
                                 "use " + " or ".join(f"'{p}'" for p in sorted(method.prepositions)))
        # what is included first (the method's words, the statement's clauses), then what is excluded
        # (the method's own exclusions, the statement's), so an exclusion always has something to act on
        clauses = [Clause(preposition="into", pattern=text, location=word.location) for text, word in args.patterns]
        clauses += [c for c in statement.clauses if c.preposition != "except"]
        clauses += [Clause(preposition="except", pattern=text, location=statement.location) for text in args.excepts]
        clauses += [c for c in statement.clauses if c.preposition == "except"]
        chosen: dict[str, set[str | None]] = {}
        named_by: dict[str, str] = {}
        lenient = args.lenient
        if not any(c.preposition != "except" for c in clauses) and method.default_target:
            # `train bias` alone: every module the method accepts
            clauses.insert(0, Clause(preposition="into", pattern=method.default_target, location=statement.location))
            lenient = True
        if not any(c.preposition != "except" for c in clauses) and method.prepositions:
            first = sorted(method.prepositions)[0]
            raise self.error(f"{method.name} needs a target: '{first} PATTERN'", statement.location)
        for clause in clauses:
            found = self.match(clause)
            if lenient:  # `train weights in classifier`: the layers inside the modules named too
                found = self.with_descendants(found)
            if lenient and clause.preposition != "except":
                covered = self.covered(method)
                found = {p: s for p, s in found.items()
                         if self.graph.modules[p].kind in method.kinds and p not in covered}
            if not found and (clause.preposition == "except" and clause not in statement.clauses):
                continue  # an exclusion the method added itself may find nothing to exclude
            if not found:
                raise self.error(f"pattern '{clause.pattern}' matches no module", clause.location,
                                 self.nearest(clause.pattern))
            if clause.preposition == "except":
                remaining = self.exclude(chosen, found)
                if not remaining and clause not in statement.clauses and lenient:
                    # a keyword's own exclusion (`quantize base`: never the head) always holds
                    raise self.error(f"nothing is left for {method.name}: the modules it matched are "
                                     f"all '{clause.pattern}', which it leaves out", statement.location,
                                     "earlier patches may already cover the rest; name a pattern to go on")
                if remaining or clause in statement.clauses:
                    chosen = remaining
                # else: a method's own default exclusion would leave nothing; its check() says why
            else:
                for path, slices in found.items():
                    chosen.setdefault(path, set()).update(slices)
                    if named_by.setdefault(path, clause.preposition) != clause.preposition:
                        raise self.error(f"{path} is named by '{named_by[path]}' and by '{clause.preposition}'",
                                         clause.location, "name each module with one preposition")
        if not chosen:
            raise self.error("nothing is left to patch after 'except'", statement.location,
                             "the except patterns remove every module the statement matched")
        return chosen, lenient, named_by

    def with_descendants(self, found: dict[str, set[str | None]]) -> dict[str, set[str | None]]:
        wider = dict(found)
        prefixes = tuple(f"{path}." for path, slices in found.items() if None in slices)
        if prefixes:
            for path in self.graph.modules:
                if path.startswith(prefixes):
                    wider.setdefault(path, set()).add(None)
        return wider

    def covered(self, method: type[Method]) -> set[str]:
        """Modules a live job already did with this method, where doing it again is refused: a
        lenient pattern (`quantize base` after `quantize base`) means the modules left."""
        if _live_conflict(method, method) is None:
            return set()
        return {old.path for old in self.live if method_of(old) is method}

    @staticmethod
    def exclude(chosen: dict[str, set[str | None]], found: dict[str, set[str | None]]) -> dict[str, set[str | None]]:
        remaining = dict(chosen)
        for path, slices in found.items():
            left = remaining.get(path, set()) - slices
            if None in slices or not left:
                remaining.pop(path, None)
            else:
                remaining[path] = left
        return remaining

    def one_per_role(self, chosen: dict[str, set[str | None]]) -> dict[str, set[str | None]]:
        """Of modules that share one role path (BERT's FFN is `intermediate` and `output`, both
        `layers.N.mlp`), the last: the sub-block's output side, where a method placed by role acts."""
        last: dict[str, str] = {}
        for path in chosen:
            roles = self.graph.modules[path].role_paths
            last[roles[0] if roles else path] = path
        kept = set(last.values())
        return {path: slices for path, slices in chosen.items() if path in kept}

    def target(self, info: ModuleInfo, slices: set[str | None], method: type[Method],
               preposition: str | None = None, label: str | None = None) -> Target:
        weight = info.params.get("weight")
        whole = None in slices
        if not whole and not method.takes_slices:
            raise PlanError(f"{method.name} cannot act on the {'/'.join(sorted(s for s in slices if s))} slice "
                            f"of the fused {info.path}")
        return Target(
            path=info.path,
            type_name=info.type_name,
            kind=info.kind,
            role=info.role_paths[0].rsplit(".", 1)[-1] if info.role_paths else None,
            slices={} if whole else {s: info.slices[s] for s in sorted(slices, key=list(info.slices).index)},
            weight_shape=weight.shape if weight else None,
            in_features=info.in_features,
            out_features=info.out_features,
            dtype=weight.dtype if weight else None,
            has_bias="bias" in info.params,
            merged=any(p.merged for p in info.params.values()),
            kv_dim=self.kv_width(info),
            hidden_size=getattr(self.graph.config, "hidden_size", None),
            max_positions=getattr(self.graph.config, "max_position_embeddings", None),
            preposition=preposition,
            label=label,
        )

    def kv_width(self, info: ModuleInfo) -> int | None:
        """For an attention module (role `...attn`): the width of its k projection, or of the k
        slice of its fused q/k/v projection."""
        roles = [r for r in info.role_paths if r.endswith("attn")]
        if not roles:
            return None
        for child in self.graph.modules.values():
            if not child.path.startswith(info.path + "."):
                continue
            if any(r in (f"{role}.k" for role in roles) for r in child.role_paths):
                return child.out_features
            if "k" in child.slices and any(r in (f"{role}.qkv" for role in roles) for r in child.role_paths):
                start, stop = child.slices["k"]
                return stop - start
        return None

    def statement_rewrites(self, index: int, statement: Statement) -> list[Rewrite]:
        method, words = self.resolve(statement)
        args = self.read_words(method, words, statement)
        params = self.validate(method, statement, args.params)
        rewrites = []
        lenient = False
        if args.adapters:
            placed = self.placed_over(method, args, params, statement)
        else:
            chosen, lenient, named_by = self.targets(method, statement, args)
            placed = self.placed(method, statement, chosen, named_by)
        for info, target in placed:
            if lenient and not method.keeps(target, params):
                continue
            reason = method.check(target, params)
            if reason:
                raise self.error(reason, statement.location, "narrow the pattern or add 'except PATTERN'")
            self.check_aliasing(info, params, statement)
            before, after = method.memory(target, params)
            rewrites.append(Rewrite(
                statement=index, verb=method.verb, method=method.name,
                params=params.model_dump(), target=target, added=method.added_shapes(target, params),
                trained=(trained := method.trained_shapes(target, params)),
                trained_tensors={n: info.params[n].name for n in trained if n in info.params},
                location=statement.location, label=target.label, bytes_before=before, bytes_after=after,
            ))
        if not rewrites and method.absent and not statement.clauses:
            raise self.error(method.absent, statement.location)
        if not rewrites:
            raise self.error(f"none of the {len(placed)} modules the statement matched is one {method.name} acts on "
                             "with these parameters", statement.location, "widen the pattern or change the parameters")
        return rewrites

    def placed(self, method: type[Method], statement: Statement, chosen: dict[str, set[str | None]],
               named_by: dict[str, str]) -> list[tuple[ModuleInfo, Target]]:
        if method.places_by_role:
            chosen = self.one_per_role(chosen)
        found = []
        for path, slices in chosen.items():
            info = self.graph.modules[path]
            try:
                found.append((info, self.target(info, slices, method, named_by.get(path), statement.name)))
            except PlanError as problem:
                raise self.error(str(problem), statement.location) from None
        return found

    def placed_over(self, method: type[Method], args: WordArgs, params: MethodParams,
                    statement: Statement) -> list[tuple[ModuleInfo, Target]]:
        """The targets of a statement over named adapters, placed by its method from theirs."""
        if statement.clauses:
            raise self.error(f"{method.name} acts where the adapters it names sit: it takes no target clause",
                             statement.clauses[0].location)
        known = list(dict.fromkeys(r.label for r in self.done if r.label))
        named: dict[str, list[tuple[Target, str, dict[str, Any]]]] = {}
        for word in args.adapters:
            if word.text not in known:
                raise self.error(f"no adapter named '{word.text}' before this statement", word.location,
                                 did_you_mean(word.text, known) or "adapters named so far: " + (", ".join(known) or "none"))
            if word.text in named:
                raise self.error(f"'{word.text}' is named twice", word.location)
            named[word.text] = [(r.target, f"{r.verb} {r.method}", r.params) for r in self.done if r.label == word.text]
        try:
            targets = method.place_over(named, params)
        except PlanError as problem:
            raise self.error(str(problem), statement.location) from None
        # a target the method names (a gate: its adapter's) keeps it; the others take the statement's
        return [(self.graph.modules[t.path], t if t.label else t.model_copy(update={"label": statement.name}))
                for t in targets]

    def check_aliasing(self, info: ModuleInfo, params: MethodParams, statement: Statement) -> None:
        if info.aliases:
            raise self.error(f"{info.path} is the same module as {', '.join(info.aliases)}; "
                             "patching one path would leave the others unpatched", statement.location)
        tied = self.graph.tied_outside(info.path)
        if tied and not params.tied:
            raise self.error(f"{info.path} shares its weights with {', '.join(tied)} (tied weights)",
                             statement.location,
                             "add tied=true to patch it anyway (a weight delta's merge then unties them), "
                             "or 'except' it")

    def order(self, rewrites: list[Rewrite]) -> tuple[Rewrite, ...]:
        """The rewrite graph: same-module rewrites must stack in an allowed order; no cycles."""
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(rewrites)))
        by_module: dict[str, list[int]] = {}
        for i, rewrite in enumerate(rewrites):
            by_module.setdefault(rewrite.target.path, []).append(i)
        for path, indices in by_module.items():
            for a in indices:
                for b in indices:
                    if a >= b:
                        continue
                    first, second = rewrites[a], rewrites[b]
                    if _side_by_side(first, second):  # named adapters on one module: in spec order
                        dag.add_edge(a, b)
                    if first.method in method_of(second).stacks_on:
                        dag.add_edge(a, b)
                    if second.method in method_of(first).stacks_on:
                        dag.add_edge(b, a)
                    refusal = method_of(second).refuses_stack.get(first.method) or \
                        method_of(first).refuses_stack.get(second.method)
                    if refusal:
                        raise self.error(f"'{second.verb} {second.method}' cannot stack on "
                                         f"'{first.verb} {first.method}' at {path}: {refusal}", second.location)
                    if not dag.has_edge(a, b) and not dag.has_edge(b, a):
                        raise self.error(
                            f"{path} is targeted twice: by '{first.verb} {first.method}' "
                            f"(line {first.location.line}) and '{second.verb} {second.method}' "
                            f"(line {second.location.line})", second.location, _twice_hint(first, second))
        if not nx.is_directed_acyclic_graph(dag):
            cycle = nx.find_cycle(dag)
            raise self.error("rewrites depend on each other in a cycle: " +
                             " -> ".join(rewrites[a].target.path for a, _ in cycle), rewrites[cycle[0][0]].location)
        return tuple(rewrites[i] for i in nx.lexicographical_topological_sort(dag))


    def check_claims(self, rewrites: list[Rewrite]) -> None:
        """Two statements may not both take over one model-wide thing (two prompt methods)."""
        firsts: dict[int, Rewrite] = {}
        for rewrite in rewrites:
            firsts.setdefault(rewrite.statement, rewrite)
        ordered = sorted(firsts.values(), key=lambda r: r.statement)
        for i, rewrite in enumerate(ordered):
            for first in ordered[:i]:
                reason = _claim_conflict(claims_of(rewrite), claims_of(first))
                if reason:
                    raise self.error(
                        f"'{rewrite.verb} {rewrite.method}' and '{first.verb} {first.method}' (line "
                        f"{first.location.line}) {reason}; they cannot compose", rewrite.location, "keep one of them")


    def check_live(self, rewrites: list[Rewrite], live: Sequence[LivePatch]) -> None:
        """A model patched by a live job: a new rewrite on one of its modules must stack on what is
        there (the live patch came first, so the new method must list it in `stacks_on`), and no
        model-wide thing may be claimed twice."""
        on_path: dict[str, list[LivePatch]] = {}
        for old in live:
            on_path.setdefault(old.path, []).append(old)
        for rewrite in rewrites:  # a model-wide conflict says more than the module it shows on
            for old in live:
                reason = _claim_conflict(claims_of(rewrite), old.claims)
                if reason:
                    raise self.error(
                        f"'{_said(method_of(rewrite))}' and the live job's '{old.statement}' {reason}; they cannot "
                        "compose", rewrite.location, "revert that job first, or keep one of them")
        for rewrite in rewrites:
            for old in on_path.get(rewrite.target.path, []):
                if old.label != rewrite.label and method_of(rewrite).shares_modules and method_of(old).shares_modules:
                    continue  # a named adapter beside the live job's
                reason = _live_conflict(method_of(rewrite), method_of(old))
                if reason:
                    raise self.error(f"{rewrite.target.path} is already patched by a live job ('{old.statement}'); "
                                     f"{reason}", rewrite.location, "revert that job first, or leave this module "
                                     "out with 'except'")


def _side_by_side(first: Rewrite, second: Rewrite) -> bool:
    """Two adapters of different names, both of methods that share modules (`shares_modules`)."""
    return first.label != second.label and method_of(first).shares_modules and method_of(second).shares_modules


def _twice_hint(first: Rewrite, second: Rewrite) -> str:
    if first.label == second.label and method_of(first).shares_modules and method_of(second).shares_modules:
        said = f"both are named '{first.label}'" if first.label else "name them"
        return f"{said}: adapters of different names ('as NAME') may share modules; or merge the statements"
    return "one rewrite per module: merge the statements (e.g. into *.attn.<q,v>) or add 'except'"


def _live_conflict(new: type[Method], old: type[Method]) -> str | None:
    """Why `new` cannot go on a module that `old` (of a live job) patched, or None: it stacks."""
    if old.name in new.stacks_on:
        return None
    if new is old and new.verb == "train":
        return None  # training a base tensor again changes no structure; each revert gives its values back
    refusal = new.refuses_stack.get(old.name) or old.refuses_stack.get(new.name)
    if refusal:
        return f"'{_said(new)}' cannot stack on '{_said(old)}': {refusal}"
    if new is old and new.verb == "inject":
        return ("its adapter has the new one's name, or neither is named: give the new statement a name of "
                "its own ('as NAME') to keep both side by side")
    if new is old:
        return f"'{_said(new)}' already acts on it"
    if new.name in old.stacks_on:
        return (f"'{_said(new)}' goes under '{_said(old)}', so it must be applied first: write both statements "
                "in one spec")
    return f"'{_said(new)}' does not stack on '{_said(old)}'"


def _said(method: type[Method]) -> str:
    """How a statement names the method: `inject lora`, `quantize` (registered under its verb)."""
    return method.verb if method.name == method.verb else f"{method.verb} {method.name}"


_CLAIMS = {"inputs": "inputs (what it sees before the first layer)", "prefix": "attention's extra keys (a prefix)",
           "rope": "rotary position embedding"}


def plan(spec: Spec, graph: ModuleGraph, live: Sequence[LivePatch] = ()) -> Plan:
    """Stage entry: check `spec` against the model graph and return the ordered rewrites. `live`:
    the patches of jobs still live on the model (an earlier apply), which the new ones stack on."""
    planner = _Planner(spec, graph, live)
    rewrites: list[Rewrite] = []
    for index, statement in enumerate(spec.statements):
        rewrites += planner.statement_rewrites(index, statement)
        planner.done = rewrites
    planner.check_claims(rewrites)
    planner.check_live(rewrites, live)
    return Plan(spec=spec, rewrites=planner.order(rewrites), base_parameters=graph.total_parameters(),
                base_bytes=graph.total_bytes())
