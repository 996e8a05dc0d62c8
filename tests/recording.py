"""A metrics sink that keeps each step's record in memory, for stage tests."""


class ListSink:
    def __init__(self):
        self.records: dict[int, dict[str, float]] = {}

    def write(self, step, metrics):
        self.records[step] = metrics

    def close(self):
        pass
