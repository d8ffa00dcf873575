"""The README's usage example runs as written and trains."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_lowers_the_loss():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:  # in order, as a reader would run them
        exec(compile(block, "README.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    assert namespace["sched"].optimizer.steps == 100
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss < 0.7 * torch.log(torch.tensor(10.0)).item()  # chance level: log(10)


def test_each_readme_example_runs_on_its_own():
    """A reader may copy one block: each has its own imports."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    for block in blocks:
        torch.manual_seed(0)
        exec(compile(block, "README.md", "exec"), {})
