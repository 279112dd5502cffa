"""Load tests of faascale functions: workloads (``workload``), the Locust users (``locustfile``,
run only as its own process) and the readable report (``report``)."""
