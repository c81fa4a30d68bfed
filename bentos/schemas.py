"""Request and response models of the service. Every bound is checked at the boundary, so bad
input is a 4xx that names the field, never a 500.

Forward compatibility: a key inside ``context`` that this version does not know is accepted,
dropped and counted (clients add context fields before the service reads them); a known key is
still validated, and an unknown field at the top level of a request is still a 400."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

Device = Literal["mobile", "desktop", "tablet"]
Referrer = Literal["direct", "search", "social", "email"]
EventKind = Literal["VIEW", "CLICK", "ADD_TO_CART", "PURCHASE", "RATING"]


class Context(BaseModel):
    """Request context. ``categories`` are onboarding categories for new users.

    Keys it does not declare are dropped after validation (nothing downstream sees them: not the
    engine, not the event sent to Kafka) and their number kept in :attr:`unknown_keys`, for the
    service to count; the declared keys keep their checks."""

    model_config = ConfigDict(extra="allow")

    device: Optional[Device] = None
    location: Optional[str] = Field(None, min_length=2, max_length=2, pattern=r"^[A-Z]{2}$")
    referrer: Optional[Referrer] = None
    categories: Optional[list[int]] = Field(None, max_length=20)
    _unknown_keys: int = PrivateAttr(default=0)

    def model_post_init(self, _: object) -> None:
        extra = self.__pydantic_extra__
        if extra:
            self._unknown_keys = len(extra)
            extra.clear()
        if self.categories is not None and any(c < 0 for c in self.categories):
            raise ValueError("context.categories must hold category ids >= 0")

    @property
    def unknown_keys(self) -> int:
        """How many keys of the request's context this version does not know (and ignored)."""
        return self._unknown_keys


class RecommendRequest(BaseModel):
    """The body of POST /recommend."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(..., ge=0)
    k: int = Field(10, ge=1, le=100)
    context: Optional[Context] = None


class EventRequest(BaseModel):
    """The body of POST /events: the server fills ``event_id`` and the time."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(..., ge=0)
    item_id: int = Field(..., ge=0)
    event_type: EventKind
    value: Optional[float] = Field(None, ge=0)
    session_id: Optional[str] = None
    context: Optional[Context] = None
    #: attribution: the answer (its ``request_id``) and the 1-based position the item was shown at
    request_id: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    position: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _position_needs_request_id(self) -> EventRequest:
        if self.position is not None and self.request_id is None:
            raise ValueError("position needs the request_id of the answer that showed the item: send both")
        return self


class RecommendedItem(BaseModel):
    item_id: int
    score: float
    title: Optional[str] = None
    price: Optional[float] = None
    image_url: Optional[str] = None
    strategy: str


class RecommendResponse(BaseModel):
    #: the answer's id, logged with its impression; send it back with /events for attribution
    request_id: str
    user_id: int
    items: list[RecommendedItem]
    cold_start: bool
    degraded: bool
    cached: bool
    model_versions: dict[str, str]
    degraded_reasons: list[str] = []
    #: the experiment's arm the user is in (bentos.experiments); null when no experiment runs
    arm: Optional[str] = None


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
