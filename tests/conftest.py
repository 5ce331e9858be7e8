from tests.gatewayproc import Process


def pytest_sessionfinish(session, exitstatus):
    # Gateways and upstreams a failed fixture could not stop itself.
    Process.stop_all()
