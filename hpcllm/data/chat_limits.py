"""Bounds on the work of a chat template: time, size and numbers, per record.

Jinja2's sandbox stops a template from reaching outside itself (no underscore attributes, no
mutation, no unsafe calls) but not from working without end: `{{ 10 ** 1000000000 }}`, two nested
`range(100000)` loops or `'a' * 10**10` hang a job or exhaust its memory. The environment here
bounds the rendering of each record:

- time: RENDER_SECONDS, checked at every operator, call, filter, loop step and output. The checks
  are cooperative: an alarm signal is process-wide, unusable off the main thread and would clash
  with the job's own signal handlers (hpcllm.train.signals);
- output: at most RENDER_OUTPUT_CHARS characters plus twice the conversation's own text;
- everything built: each value an operator, `~`, literal, call, filter or captured block output
  makes is counted with all it holds (a string its characters, a list or dict its items and what
  they hold), at most BUILD_FACTOR times the output limit in all — so every value a template can
  hold is bounded, and so is the work of a comparison, a str() or a sort of it. The operations
  whose result can outgrow their operands (`*`, `**`, `+`, `%`, `~`, format widths, `join`,
  `replace`, `translate`, `expandtabs`, `indent`, `tojson`, `sum`, `lipsum`) are estimated before
  they run, so none allocates past the limit; a number passed to a call or filter counts as its
  value (a width, a count, a range);
- one step: a filter that works item by item in Python (sort, map, urlize, ...) takes at most
  SLOW_ITEMS items or characters, so one call cannot outlast the clock by much;
- integers: at most MAX_INT_BITS bits;
- recursion and memory: Python's recursion limit, and a MemoryError, end the record like an error.

Real chat templates (Llama 3, Qwen, Mistral) render in well under a millisecond and build a few times
their conversation: the limits stop only templates written to stop the job.
"""

from __future__ import annotations

import contextvars
import functools
import math
import re
import string
import time
import types
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import generate_lorem_ipsum

RENDER_SECONDS = 1.0
RENDER_OUTPUT_CHARS = 1_000_000  # beyond twice the conversation's own text
BUILD_FACTOR = 8  # everything a record's rendering builds, in units of its output limit
SLOW_ITEMS = 1_000_000  # the most items or characters one Python-level filter call may take
MAX_INT_BITS = 1 << 16  # about 20,000 decimal digits
MAX_TEMPLATE_CHARS = 1_000_000  # real templates are a few kilobytes

# filters that spend Python time on every item or character, and how much (pprint and urlize ~10x)
SLOW_FILTERS = {**dict.fromkeys(("batch", "dictsort", "groupby", "map", "max", "min", "reject", "rejectattr",
                                 "select", "selectattr", "slice", "sort", "sum", "title", "unique", "wordwrap",
                                 "xmlattr"), 1),
                "pprint": 10, "urlize": 10}

_active: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


class RenderLimit(Exception):
    """A record's rendering went past one of the limits above."""


def _count(n: float) -> str:
    if n == math.inf:
        return "an unbounded number of"
    return f"{n:,}" if n < 10**15 else f"about 10^{int(math.log10(n))}"


# ------------------------------------------------------------------------------ sizes of values


def weight(value: Any, limit: float = math.inf) -> int:
    """What `value` holds: a string its characters, a list/tuple/set/dict its items plus what they
    hold. Counted until `limit` is passed, so the count costs at most `limit` steps."""
    return _shape(value, limit)[0]


def _shape(value: Any, limit: float) -> tuple[int, int]:
    """(weight, nesting depth) of `value`. A container met again (one list held many times, or an
    operand weighed before) is counted again, as str() and json would write it again, but from the
    render's memo: weighing costs each container once, not once per operation on it."""
    budget = _active.get()
    memo = budget.memo if budget is not None else {}

    def visit(v: Any) -> tuple[int, int]:
        if isinstance(v, (str, bytes)):
            return len(v), 0
        if isinstance(v, range):
            return len(v), 1
        if not isinstance(v, (list, tuple, set, frozenset, dict)):
            return 0, 0
        if id(v) in memo:
            return memo[id(v)][:2]
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
        w, depth = len(v), 0
        kinds = set(map(type, items))
        if kinds <= {str}:  # the common large case (a split, a list of texts), counted at C speed
            w += sum(map(len, items))
        elif not kinds <= _SCALARS:
            for x in items:
                xw, xd = visit(x)
                w, depth = w + xw, max(depth, xd)
                if w > limit:
                    return w, depth + 1  # a partial count, past the limit: the render stops here
        memo[id(v)] = (w, depth + 1, v)  # v held, so that its id is not reused while the memo lives
        return w, depth + 1

    return visit(value)


_SCALARS = {int, float, bool, type(None)}


def _weights(args: tuple, kwargs: dict) -> int:
    return sum(weight(a) for a in (*args, *kwargs.values()))


def _numbers(args: tuple, kwargs: dict) -> int:
    """The numbers among a call's arguments, each counted as its value (a width, a count, a range)."""
    named = (v for k, v in kwargs.items() if not k.startswith("_"))  # not Jinja's _loop_vars, _block_vars
    return sum(abs(a) for a in (*args, *named) if isinstance(a, int))


def _items(value: Any) -> int:
    """The items (or characters) a filter walks through: the top level only."""
    return len(value) if hasattr(value, "__len__") else 0


class _Budget:
    def __init__(self, conversation_chars: int):
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.output_limit = RENDER_OUTPUT_CHARS + 2 * conversation_chars
        self.output_left = self.output_limit
        self.build_left = BUILD_FACTOR * self.output_limit
        self.memo: dict[int, tuple[int, int, Any]] = {}  # id -> (weight, depth, container): see _shape

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"it ran for more than {RENDER_SECONDS:g} s")

    def need(self, n: float, what: str) -> None:
        """Refuse, before it runs, an operation that would build about `n` characters or items."""
        self.tick()
        if n > self.build_left:
            raise RenderLimit(f"{what} would build {_count(n)} characters or items, past the "
                              f"{max(self.build_left, 0):,} left of its limit")

    def spend(self, value: Any, what: str) -> Any:
        self.build_left -= weight(value, self.build_left + 1)
        if self.build_left < 0:
            raise RenderLimit(f"{what} took it past the {BUILD_FACTOR * self.output_limit:,} characters or items "
                              "it may build")
        return value

    def output(self, chunk: str) -> None:
        self.tick()
        self.output_left -= len(chunk)
        if self.output_left < 0:
            raise RenderLimit(f"its output passed {self.output_limit:,} characters")


def _budget() -> _Budget:
    b = _active.get()
    if b is None:  # compile time: Jinja folds constants by calling filters; this leaves them to run time
        raise RenderLimit("a chat template's operations run only inside render_bounded")
    return b


# ------------------------------------------------------------------ estimates of growing operations

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?")


def _printf_widths(fmt: str) -> float:
    """The characters `fmt % args` may add beyond its text and arguments (widths and precisions)."""
    total = 0
    for width, precision in _PRINTF.findall(fmt):
        if "*" in (width, precision):
            return math.inf  # a width taken from the arguments
        total += max(int(width or 0), int(precision or 0)) + 24  # + the digits of a number
    return total


def _format_widths(fmt: str) -> float:
    """The same for str.format's `{:>20}` fields."""
    total = 0
    try:
        for _, field, spec, _ in string.Formatter().parse(fmt):
            if spec and "{" in spec:
                return math.inf  # a nested field: a width computed at run time
            if field is not None:
                total += max((int(d) for d in re.findall(r"\d+", spec or "")), default=0) + 24
    except ValueError:
        return 0  # malformed: str.format itself raises
    return total


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> float:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return weight(s) * max(1, weight(new))
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _join_size(sep: Any, items: Any) -> float:
    return weight(items) + weight(sep) * _items(items)


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> float:
    per_line = width if isinstance(width, int) else weight(width)
    lines = s.count("\n") + 1 if isinstance(s, str) else weight(s)
    return weight(s) + lines * max(per_line, 0)


def _tojson_size(x: Any, *_: Any, indent: Any = None, **__: Any) -> float:
    w, depth = _shape(x, math.inf)
    step = indent if isinstance(indent, int) else weight(indent)
    return 6 * w + 2 + w * depth * max(step, 0)  # \uXXXX escapes at most; every item on a line indented by depth


def _sum_size(items: Any, attribute: Any = None, start: Any = 0) -> float:
    if isinstance(start, (int, float)):
        return 0
    return _items(items) * (weight(items) + weight(start))  # adding sequences copies the sum so far at every item


def _str_method_size(method: Any, args: tuple, kwargs: dict) -> float:
    """The size estimate of a call of a str method that can outgrow its string and arguments."""
    s, name = method.__self__, method.__name__
    if name == "join" and args:
        return _join_size(s, args[0])
    if name == "replace" and len(args) >= 2:
        return _replace_size(s, *args[:3])
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * (tab if isinstance(tab, int) else 0)
    if name == "translate" and args and isinstance(args[0], dict):
        return len(s) * max(1, max((weight(v) for v in args[0].values()), default=1))
    if name in ("format", "format_map"):
        return len(s) + _weights(args, kwargs) + _format_widths(s)
    return 0


_FILTER_SIZES = {
    "join": lambda value, d="", attribute=None: _join_size(d, value),
    "replace": lambda s, old, new, count=None: _replace_size(s, old, new, -1 if count is None else count),
    "indent": _indent_size,
    "format": lambda value, *args, **kwargs: (weight(value) + _weights(args, kwargs)
                                              + (_printf_widths(value) if isinstance(value, str) else 0)),
    "tojson": _tojson_size,
    "sum": _sum_size,
}


def _lazy(x: Any) -> bool:
    """An iterator (a filter's generator): its size is known only once it is drawn."""
    return hasattr(x, "__iter__") and not hasattr(x, "__len__")


# ------------------------------------------------------------------------------ the environment


class _CheckedCodeGenerator(CodeGenerator):
    """Jinja's code generator with the operations it writes inline routed through the budget: loop
    steps, `~`, literals, outputs and block buffers."""

    def visit_For(self, node, frame):
        node.iter = nodes.Call(nodes.EnvironmentAttribute("checked_iter"), [node.iter], [], None, None,
                               lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node, frame):  # as Jinja's, with the parts weighed before the join
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.built({join}(environment.checked_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))), '~')")

    def _literal(self, visit, node, frame):
        self.write("environment.built(")
        visit(node, frame)
        self.write(", 'a literal')")

    def visit_List(self, node, frame):
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "load":
            self._literal(super().visit_Tuple, node, frame)
        else:  # an assignment target: `{% for a, b in ... %}`
            super().visit_Tuple(node, frame)

    def _output_child_pre(self, node, frame, finalize):
        super()._output_child_pre(node, frame, finalize)
        self.write("environment.checked_output(")

    def _output_child_post(self, node, frame, finalize):
        self.write(")")
        super()._output_child_post(node, frame, finalize)

    def buffer(self, frame):  # a macro's, `{% set %}` block's, filter or call block's output
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class _OutputBuffer(list):
    """What a block collects is joined in one step when the block ends: counted as it is collected."""

    def append(self, item):
        _budget().spend(item, "a block's output")
        super().append(item)

    def extend(self, items):
        items = tuple(items)
        _budget().spend(items, "a block's output")
        super().extend(items)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operation of a template checked against the budget of the
    record being rendered (render_bounded). Call check_filters() once its filters are all set."""

    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        b = _budget()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if left.bit_length() * right > MAX_INT_BITS:
                raise RenderLimit(f"{left} ** {right} has more than {MAX_INT_BITS:,} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimit(f"a product of more than {MAX_INT_BITS:,} bits")
        elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            b.need(max(n, 0) * weight(seq, b.build_left + 1), "'*'")
        elif operator == "+" and not ints:
            b.need(weight(left, b.build_left + 1) + weight(right, b.build_left + 1), "'+'")
        elif operator == "%" and isinstance(left, str):
            b.need(len(left) + weight(right, b.build_left + 1) + _printf_widths(left), "'%'")
        else:
            b.tick()
        return b.spend(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        if getattr(__obj, "__func__", None) is BoundedSandbox.checked_iter:
            return __self.checked_iter(*args)
        b = _budget()
        name = "range" if __obj is safe_range else getattr(__obj, "__name__", "a call")
        b.need(_numbers(args, kwargs), f"{name}()")
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox's formatter
        if isinstance(method, types.BuiltinMethodType) and isinstance(method.__self__, str):
            if name == "join" and args and _lazy(args[0]):
                args = (list(__self.checked_iter(args[0])), *args[1:])
            b.need(_str_method_size(method, args, kwargs), f"str.{name}()")
        elif __obj is generate_lorem_ipsum:  # n paragraphs of up to `max` words, made word by word
            given = {**dict(zip(("n", "html", "min", "max"), args)), **kwargs}
            n, m = given.get("n", 5), given.get("max", 100)
            if isinstance(n, int) and isinstance(m, int) and n * m > SLOW_ITEMS:
                raise RenderLimit(f"lipsum() of {n:,} paragraphs of up to {m:,} words")
        return b.spend(super().call(__context, __obj, *args, **kwargs), f"{name}()")

    def check_filters(self) -> None:
        """Wrap every filter: numbers and size estimates checked before it runs, the clock checked,
        its result counted."""
        for name, f in list(self.filters.items()):
            self.filters[name] = self._checked_filter(name, f)

    def _checked_filter(self, name: str, f):
        passes = getattr(f, "jinja_pass_arg", None) is not None  # a context/environment comes first
        estimate, slow = _FILTER_SIZES.get(name), SLOW_FILTERS.get(name)

        @functools.wraps(f)
        def checked(*args, **kwargs):
            b = _budget()
            values = args[1:] if passes else args
            if name in ("join", "sum") and values and _lazy(values[0]):
                values = (list(self.checked_iter(values[0])), *values[1:])
                args = (*args[:1], *values) if passes else values
            b.need(_numbers(values[1:], kwargs), f"filter '{name}'")
            if slow and values and _items(values[0]) * slow > SLOW_ITEMS:
                raise RenderLimit(f"filter '{name}' on {_items(values[0]):,} items, more than the "
                                  f"{SLOW_ITEMS // slow:,} it may take")
            if estimate is not None:
                b.need(estimate(*values, **kwargs), f"filter '{name}'")
            return b.spend(f(*args, **kwargs), f"filter '{name}'")

        return checked

    # called from the generated code (_CheckedCodeGenerator)
    def checked_iter(self, iterable):
        b = _budget()
        for item in iterable:
            b.tick()
            yield item

    def checked_parts(self, parts: tuple) -> tuple:
        b = _budget()
        b.need(sum(weight(p, b.build_left + 1) for p in parts), "'~'")
        return parts

    def built(self, value, what: str):
        return _budget().spend(value, what)

    def checked_output(self, value):
        b = _budget()
        b.need(weight(value, b.build_left + 1), "an output")
        return value

    def output_buffer(self) -> list:
        return _OutputBuffer()


def render_bounded(template: jinja2.Template, variables: dict) -> str:
    """The template's text for `variables`, within the limits above (RenderLimit past one of them)."""
    budget = _Budget(weight(variables))
    token = _active.set(budget)
    try:
        out = []
        for chunk in template.generate(**variables):
            budget.output(chunk)
            out.append(chunk)
        return "".join(out)
    finally:
        _active.reset(token)
