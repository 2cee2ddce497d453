"""Admission control: the request-body bytes one process works on at once, and a burst of big mail."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import webtest

import gmail
import mailer
from appengine_mailer.admission import MB, Admission
from appengine_mailer.errors import ServiceUnavailable
from conftest import KEY, form, server_env
from test_mailer import make_message
from test_serve import big_text_message


class Holder:
    """A request in its own thread: asks for `size` bytes, keeps them until released."""

    def __init__(self, admission: Admission, size: int, name: str = "", log: list | None = None):
        self.entered, self.release, self.outcome = threading.Event(), threading.Event(), []
        self.thread = threading.Thread(target=self._run, args=(admission, size, name, log), daemon=True)
        self.thread.start()

    def _run(self, admission, size, name, log):
        try:
            with admission.admit(size):
                if log is not None:
                    log.append(name)
                self.outcome.append("in")
                self.entered.set()
                self.release.wait(60)
        except ServiceUnavailable as refusal:
            self.outcome.append(refusal)
            self.entered.set()


def hold(admission: Admission, size: int) -> Holder:
    """Admit `size` bytes in a thread and keep them until .release is set."""
    holder = Holder(admission, size)
    assert holder.entered.wait(60) and holder.outcome == ["in"]
    return holder


def test_requests_within_the_budget_go_in_together():
    admission = Admission(10 * MB)
    with admission.admit(4 * MB), admission.admit(6 * MB):
        assert admission.in_flight == 10 * MB
    assert admission.in_flight == 0


def test_over_the_budget_waits_for_room_then_goes_in():
    admission = Admission(10 * MB, wait=60)
    first = hold(admission, 8 * MB)
    waiter = Holder(admission, 5 * MB)
    assert not waiter.entered.wait(0.3) and admission.in_flight == 8 * MB  # still waiting
    first.release.set()
    assert waiter.entered.wait(60) and waiter.outcome == ["in"]
    assert admission.in_flight == 5 * MB
    waiter.release.set()


def test_no_room_within_the_wait_is_503_with_retry_after():
    admission = Admission(10 * MB, wait=0.2, retry_after=2)
    holder = hold(admission, 8 * MB)
    with pytest.raises(ServiceUnavailable) as refused, admission.admit(5 * MB):
        pass
    assert refused.value.status.startswith("503") and ("Retry-After", "2") in refused.value.headers
    assert admission.in_flight == 8 * MB  # the refused request holds nothing
    holder.release.set()


def test_a_request_larger_than_the_whole_budget_goes_in_alone():
    admission = Admission(10 * MB, wait=0.2)
    with admission.admit(30 * MB):  # nothing else in flight: it is served
        assert admission.in_flight == 30 * MB
        with pytest.raises(ServiceUnavailable), admission.admit(1):  # and nothing joins it
            pass
    holder = hold(admission, 1 * MB)
    with pytest.raises(ServiceUnavailable), admission.admit(30 * MB):  # it waits for the process to be empty
        pass
    holder.release.set()


def test_first_come_first_served_so_a_big_request_is_not_starved():
    admission = Admission(10 * MB, wait=60)
    first = hold(admission, 6 * MB)
    order: list = []
    big = Holder(admission, 8 * MB, "big", order)
    while not admission._queue:  # the big one is waiting in line
        time.sleep(0.01)
    small = Holder(admission, 1 * MB, "small", order)
    assert not small.entered.wait(0.3)  # 1 MB would fit, but it is not its turn
    first.release.set()
    assert big.entered.wait(60)
    big.release.set()
    assert small.entered.wait(60)
    small.release.set()
    assert order == ["big", "small"]


def test_the_app_answers_503_with_retry_after_when_busy(mail_stub):
    admission = Admission(1 * MB, wait=0.1)
    app = webtest.TestApp(mailer.make_app([KEY], admission=admission), lint=True)
    holder = hold(admission, 1 * MB)
    res = app.post("/", form(make_message().as_bytes()), content_type="application/x-www-form-urlencoded", status=503)
    assert res.headers["Retry-After"] and "busy" in res.text and mail_stub.sent == []
    holder.release.set()
    holder.thread.join(60)
    app.post("/", form(make_message().as_bytes()), content_type="application/x-www-form-urlencoded", status=204)
    assert len(mail_stub.sent) == 1 and admission.in_flight == 0


def test_budget_from_the_environment(tmp_path):
    app = mailer.app_from_environment({"GMAIL_SECRET_KEY": "k" * 20, "GMAIL_MAX_INFLIGHT_MB": "40"}, tmp_path)
    assert app.admission.budget == 40 * MB


def test_burst_of_big_messages_is_delivered_exactly_once_within_memory(start_server, smtp_sink, tmp_path):
    server = start_server(server_env(tmp_path, smtp_sink, GMAIL_MAX_INFLIGHT_MB="40"))
    proxy = gmail.GmailProxy(KEY, server.url)
    assert proxy.send_mail(make_message(Subject="warm up").as_bytes())
    before = server.peak_rss()
    messages = [big_text_message(20 * MB, subject=f"burst {i}") for i in range(6)]
    start = threading.Barrier(len(messages))

    def send(msg: bytes) -> list:
        """A client that honours Retry-After: gmail.py retries a 503 once itself, this loop again after that."""
        answers = []
        with gmail.GmailProxy(KEY, server.url, timeout=120) as client:
            start.wait(60)
            for _ in range(60):
                try:
                    client.send_mail(msg)
                    return [*answers, 204]
                except gmail.MessageSendingFailure as failure:
                    answers.append(failure.status)
                    if failure.status != 503:
                        return answers
                    time.sleep(1)
        return answers

    with ThreadPoolExecutor(len(messages)) as pool:
        answers = list(pool.map(send, messages))
    assert all(got[-1] == 204 and set(got) <= {204, 503} for got in answers), answers
    received = smtp_sink.wait_for(7, timeout=60)
    subjects = sorted(envelope.message["Subject"] for envelope in received[1:])
    assert subjects == [f"burst {i}" for i in range(6)]  # each exactly once
    assert server.peak_rss() - before <= 400 * MB
    assert not any("internal error" in line or " 500 " in line for line in server.log_lines)
