"""Errors raised by the KVM test host client and launcher."""


class TestHostError(Exception):
    """The test host refused a request or could not be reached.

    ``code`` is the errno-like word from the host's ``ERR`` reply (for
    example ``EINVAL`` or ``EBUSY``), or ``ECONN`` / ``EPROTO`` when the
    failure happened on the client side.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
