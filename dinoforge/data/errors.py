"""The one error type for a dataset that cannot be used as given (wrong layout, not a dataset, nothing readable)."""


class DatasetError(ValueError):
    """A dataset path or its contents is unusable; the message names the path, what was found and what is expected.

    A ValueError so callers that caught the plain ValueErrors of earlier versions keep working; the CLIs report it
    on one line.
    """
