"""Request and response models of the service. Every bound is checked at the boundary, so bad
input is a 4xx that names the field, never a 500."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["mobile", "desktop", "tablet"]
Referrer = Literal["direct", "search", "social", "email"]
EventKind = Literal["VIEW", "CLICK", "ADD_TO_CART", "PURCHASE", "RATING"]


class Context(BaseModel):
    """Request context. ``categories`` are onboarding categories for new users."""

    model_config = ConfigDict(extra="forbid")

    device: Optional[Device] = None
    location: Optional[str] = Field(None, min_length=2, max_length=2, pattern=r"^[A-Z]{2}$")
    referrer: Optional[Referrer] = None
    categories: Optional[list[int]] = Field(None, max_length=20)

    def model_post_init(self, _: object) -> None:
        if self.categories is not None and any(c < 0 for c in self.categories):
            raise ValueError("context.categories must hold category ids >= 0")


class RecommendedItem(BaseModel):
    item_id: int
    score: float
    title: Optional[str] = None
    price: Optional[float] = None
    image_url: Optional[str] = None
    strategy: str


class RecommendResponse(BaseModel):
    user_id: int
    items: list[RecommendedItem]
    cold_start: bool
    degraded: bool
    cached: bool
    model_versions: dict[str, str]
    degraded_reasons: list[str] = []


class SimilarItemsResponse(BaseModel):
    item_id: int
    items: list[RecommendedItem]


class EventAccepted(BaseModel):
    event_id: str
    event_timestamp: str
    status: Literal["accepted", "unavailable"] = "accepted"


class NewItem(BaseModel):
    """A catalogue item added while serving (POST /items)."""

    model_config = ConfigDict(extra="forbid")

    item_id: int = Field(..., ge=0)
    title: str = Field(..., min_length=1, max_length=500)
    category_id: int = Field(..., ge=0)
    tags: list[str] = Field(default_factory=list, max_length=50)
    price: float = Field(0.0, ge=0)
    margin: float = Field(0.0, ge=0, le=1)
    quality_score: float = Field(3.0, ge=0, le=5)
    inventory: int = Field(1, ge=0)
    image_url: Optional[str] = Field(None, max_length=2000)


class ItemAdded(BaseModel):
    item_id: int
    indexed: bool
    embedding_from: str
