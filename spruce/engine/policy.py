"""Scheduling policies: the order waiting requests are admitted in, and who is preempted first.

The scheduler owns the mechanism (budgets, KV allocation); a policy only orders. Lower
`priority` values are served first (vLLM's convention); ties go to the earlier arrival.
"""
from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from typing import Iterable, Iterator

from spruce.request import Request


class WaitingQueue(ABC):
    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Put back a request that was preempted or could not be admitted this step."""

    @abstractmethod
    def peek(self) -> Request: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def remove(self, requests: Iterable[Request]) -> None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...


class SchedulingPolicy(ABC):
    name: str

    @abstractmethod
    def new_waiting_queue(self) -> WaitingQueue: ...

    @abstractmethod
    def pick_victim(self, running: list[Request]) -> Request:
        """The running request to preempt when KV blocks run out."""


class _FCFSQueue(WaitingQueue):
    def __init__(self):
        self._q: deque[Request] = deque()

    def add(self, request):
        self._q.append(request)

    def prepend(self, request):
        self._q.appendleft(request)

    def peek(self):
        return self._q[0]

    def pop(self):
        return self._q.popleft()

    def remove(self, requests):
        drop = {id(r) for r in requests}
        self._q = deque(r for r in self._q if id(r) not in drop)

    def __len__(self):
        return len(self._q)

    def __iter__(self):
        return iter(self._q)


class _PriorityQueue(WaitingQueue):
    def __init__(self):
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = 0  # tie-break that keeps heap comparisons off Request objects

    def add(self, request):
        self._seq += 1
        heapq.heappush(self._heap, (request.priority, request.arrival_time, self._seq, request))

    prepend = add  # a preempted request keeps its place by (priority, arrival)

    def peek(self):
        return self._heap[0][3]

    def pop(self):
        return heapq.heappop(self._heap)[3]

    def remove(self, requests):
        drop = {id(r) for r in requests}
        self._heap = [e for e in self._heap if id(e[3]) not in drop]
        heapq.heapify(self._heap)

    def __len__(self):
        return len(self._heap)

    def __iter__(self):
        return (e[3] for e in sorted(self._heap))


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def new_waiting_queue(self):
        return _FCFSQueue()

    def pick_victim(self, running):
        return running[-1]  # the latest admitted has done the least work


class PriorityPolicy(SchedulingPolicy):
    name = "priority"

    def new_waiting_queue(self):
        return _PriorityQueue()

    def pick_victim(self, running):
        return max(running, key=lambda r: (r.priority, r.arrival_time))


def make_policy(name: str) -> SchedulingPolicy:
    policies = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}
    if name not in policies:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(policies)}")
    return policies[name]()
