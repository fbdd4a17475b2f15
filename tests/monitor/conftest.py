import pytest

from tests.monitor.prom_util import PROMETHEUS, PUSHGATEWAY, start_stack


@pytest.fixture(scope="session")
def prom(tmp_path_factory):
    """A Prometheus scraping a Pushgateway, both on free loopback ports (tests/monitor/prom_util.py)."""
    if not (PROMETHEUS and PUSHGATEWAY):
        pytest.skip("prometheus / prometheus-pushgateway not installed (scripts/install_system_deps.sh, run by "
                    "`make test`, installs them)")
    stack = start_stack(tmp_path_factory.mktemp("prometheus"))
    yield stack
    stack.stop()
