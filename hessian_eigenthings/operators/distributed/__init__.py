"""Operators for data (and parameters) split over ``torch.distributed`` ranks."""

__all__: list[str] = []
