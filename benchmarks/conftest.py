"""`pytest benchmarks/` collects the bench_*.py files (pytest-benchmark tests at small sizes).
pytest.ini passes --benchmark-disable (each benchmark then runs once, as a test); add
--benchmark-enable to time them."""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; only add the ones found in a folder.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
