"""Marking a function whose result torch.compile may take as a constant, without importing the compiler.

torch.compile calls such a function while it traces and puts its result in the graph as a constant,
instead of tracing into it: fastgpt's ops resolve their backend this way. torch's own decorator,
`torch.compiler.assume_constant_result`, imports torch._dynamo to do it, which takes about as long
as importing torch itself, and every fastgpt program would pay for it at start-up, even those that
never compile (sampling and evaluation start in half the time without it). The decorator only sets
one attribute on the function, which this sets directly. tests/test_compile_constant.py checks that
torch's decorator still marks a function exactly so, and the compile tests with fullgraph=True that
the mark still keeps torch.compile out of the marked functions.
"""

# The attribute torch._dynamo.assume_constant_result sets.
_MARK = "_dynamo_marked_constant"


def assume_constant_result(fn):
    """`fn`, marked as torch.compiler.assume_constant_result marks it."""
    setattr(fn, _MARK, True)
    return fn
