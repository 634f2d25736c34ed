"""fastgpt.compile_constant marks functions for torch.compile as torch's own decorator does, without
importing torch._dynamo in programs that never compile."""

import subprocess
import sys

import torch

from fastgpt.compile_constant import assume_constant_result


def test_marks_a_function_as_torchs_decorator_does():
    def by_torch():
        pass

    def by_fastgpt():
        pass

    torch.compiler.assume_constant_result(by_torch)
    assume_constant_result(by_fastgpt)
    assert vars(by_fastgpt) == vars(by_torch) != {}


def test_torch_compile_takes_the_result_as_a_constant():
    table = {"factor": 2}

    @assume_constant_result
    def factor():
        return table["factor"]

    compiled = torch.compile(lambda x: x * factor(), backend="eager", fullgraph=True)
    assert compiled(torch.ones(1)).item() == 2
    table["factor"] = 3  # traced into, the lookup would be guarded and this would retrace
    assert compiled(torch.ones(1)).item() == 2


def test_sampling_and_evaluation_do_not_import_the_compiler():
    code = "import sys, fastgpt.sample, fastgpt.eval; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
