from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Channel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_UNSPECIFIED: _ClassVar[Channel]
    CHANNEL_EMAIL: _ClassVar[Channel]
    CHANNEL_WEB: _ClassVar[Channel]
    CHANNEL_APP: _ClassVar[Channel]

class NotPersonalizedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOT_PERSONALIZED_REASON_UNSPECIFIED: _ClassVar[NotPersonalizedReason]
    NOT_PERSONALIZED_REASON_NO_CONSENT: _ClassVar[NotPersonalizedReason]
    NOT_PERSONALIZED_REASON_UNKNOWN_CUSTOMER: _ClassVar[NotPersonalizedReason]
    NOT_PERSONALIZED_REASON_ERASED: _ClassVar[NotPersonalizedReason]
    NOT_PERSONALIZED_REASON_CONSENT_UNAVAILABLE: _ClassVar[NotPersonalizedReason]
    NOT_PERSONALIZED_REASON_HOLDOUT: _ClassVar[NotPersonalizedReason]

class ReasonKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_KIND_UNSPECIFIED: _ClassVar[ReasonKind]
    REASON_KIND_BOUGHT_RELATED: _ClassVar[ReasonKind]
    REASON_KIND_REPURCHASE_DUE: _ClassVar[ReasonKind]
    REASON_KIND_POPULAR: _ClassVar[ReasonKind]
    REASON_KIND_BOUGHT_RECENTLY: _ClassVar[ReasonKind]
    REASON_KIND_PREDICTED_INTEREST: _ClassVar[ReasonKind]
    REASON_KIND_SIMILAR_TO: _ClassVar[ReasonKind]
    REASON_KIND_FATIGUE: _ClassVar[ReasonKind]

class Rule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RULE_UNSPECIFIED: _ClassVar[Rule]
    RULE_CONSENT: _ClassVar[Rule]
    RULE_SENSITIVITY: _ClassVar[Rule]
    RULE_UNAVAILABLE: _ClassVar[Rule]
    RULE_FILTER: _ClassVar[Rule]
    RULE_ALREADY_BOUGHT: _ClassVar[Rule]
    RULE_OUTRANKED: _ClassVar[Rule]
    RULE_BELOW_MIN_VALUE: _ClassVar[Rule]
    RULE_FATIGUE: _ClassVar[Rule]
CHANNEL_UNSPECIFIED: Channel
CHANNEL_EMAIL: Channel
CHANNEL_WEB: Channel
CHANNEL_APP: Channel
NOT_PERSONALIZED_REASON_UNSPECIFIED: NotPersonalizedReason
NOT_PERSONALIZED_REASON_NO_CONSENT: NotPersonalizedReason
NOT_PERSONALIZED_REASON_UNKNOWN_CUSTOMER: NotPersonalizedReason
NOT_PERSONALIZED_REASON_ERASED: NotPersonalizedReason
NOT_PERSONALIZED_REASON_CONSENT_UNAVAILABLE: NotPersonalizedReason
NOT_PERSONALIZED_REASON_HOLDOUT: NotPersonalizedReason
REASON_KIND_UNSPECIFIED: ReasonKind
REASON_KIND_BOUGHT_RELATED: ReasonKind
REASON_KIND_REPURCHASE_DUE: ReasonKind
REASON_KIND_POPULAR: ReasonKind
REASON_KIND_BOUGHT_RECENTLY: ReasonKind
REASON_KIND_PREDICTED_INTEREST: ReasonKind
REASON_KIND_SIMILAR_TO: ReasonKind
REASON_KIND_FATIGUE: ReasonKind
RULE_UNSPECIFIED: Rule
RULE_CONSENT: Rule
RULE_SENSITIVITY: Rule
RULE_UNAVAILABLE: Rule
RULE_FILTER: Rule
RULE_ALREADY_BOUGHT: Rule
RULE_OUTRANKED: Rule
RULE_BELOW_MIN_VALUE: Rule
RULE_FATIGUE: Rule

class ExperimentArm(_message.Message):
    __slots__ = ("experiment", "variant")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("kind", "product_id", "product_title", "days", "text")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_TITLE_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    kind: ReasonKind
    product_id: str
    product_title: str
    days: float
    text: str
    def __init__(self, kind: _Optional[_Union[ReasonKind, str]] = ..., product_id: _Optional[str] = ..., product_title: _Optional[str] = ..., days: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RecommendProductsRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "channel", "include_categories", "exclude_categories", "exclude_product_ids", "include_purchased", "request_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PURCHASED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    channel: Channel
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_product_ids: _containers.RepeatedScalarFieldContainer[str]
    include_purchased: bool
    request_id: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., channel: _Optional[_Union[Channel, str]] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., exclude_product_ids: _Optional[_Iterable[str]] = ..., include_purchased: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecommendedProduct(_message.Message):
    __slots__ = ("product_id", "score", "reasons", "title", "category", "price")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    score: float
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    title: str
    category: str
    price: float
    def __init__(self, product_id: _Optional[str] = ..., score: _Optional[float] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., price: _Optional[float] = ...) -> None: ...

class RecommendProductsResponse(_message.Message):
    __slots__ = ("customer_id", "request_id", "items", "model_version", "personalized", "not_personalized_reason", "error", "decisions", "withheld", "experiment", "attribution_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    NOT_PERSONALIZED_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[RecommendedProduct]
    model_version: str
    personalized: bool
    not_personalized_reason: NotPersonalizedReason
    error: RequestError
    decisions: _containers.RepeatedScalarFieldContainer[str]
    withheld: int
    experiment: ExperimentArm
    attribution_id: str
    def __init__(self, customer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RecommendedProduct, _Mapping]]] = ..., model_version: _Optional[str] = ..., personalized: _Optional[bool] = ..., not_personalized_reason: _Optional[_Union[NotPersonalizedReason, str]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ..., decisions: _Optional[_Iterable[str]] = ..., withheld: _Optional[int] = ..., experiment: _Optional[_Union[ExperimentArm, _Mapping]] = ..., attribution_id: _Optional[str] = ...) -> None: ...

class SimilarProductsRequest(_message.Message):
    __slots__ = ("product_ids", "limit", "customer_id")
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    customer_id: str
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., customer_id: _Optional[str] = ...) -> None: ...

class SimilarProductsResponse(_message.Message):
    __slots__ = ("items", "unknown_product_ids", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedProduct]
    unknown_product_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedProduct, _Mapping]]] = ..., unknown_product_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ContentCandidate(_message.Message):
    __slots__ = ("content_id", "title", "product_ids", "categories")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    title: str
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content_id: _Optional[str] = ..., title: _Optional[str] = ..., product_ids: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreContentRequest(_message.Message):
    __slots__ = ("customer_id", "candidates", "channel")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[ContentCandidate]
    channel: Channel
    def __init__(self, customer_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[ContentCandidate, _Mapping]]] = ..., channel: _Optional[_Union[Channel, str]] = ...) -> None: ...

class ScoredContent(_message.Message):
    __slots__ = ("content_id", "title", "kind", "relevance", "reasons")
    CONTENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    content_id: str
    title: str
    kind: str
    relevance: float
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    def __init__(self, content_id: _Optional[str] = ..., title: _Optional[str] = ..., kind: _Optional[str] = ..., relevance: _Optional[float] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ...) -> None: ...

class ScoreContentResponse(_message.Message):
    __slots__ = ("customer_id", "items", "model_version", "personalized", "not_personalized_reason", "experiment")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    NOT_PERSONALIZED_REASON_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredContent]
    model_version: str
    personalized: bool
    not_personalized_reason: NotPersonalizedReason
    experiment: ExperimentArm
    def __init__(self, customer_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredContent, _Mapping]]] = ..., model_version: _Optional[str] = ..., personalized: _Optional[bool] = ..., not_personalized_reason: _Optional[_Union[NotPersonalizedReason, str]] = ..., experiment: _Optional[_Union[ExperimentArm, _Mapping]] = ...) -> None: ...

class ExplainRecommendationRequest(_message.Message):
    __slots__ = ("customer_id", "product_id", "channel", "limit", "include_categories", "exclude_categories", "exclude_product_ids", "include_purchased")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PURCHASED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    product_id: str
    channel: Channel
    limit: int
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_product_ids: _containers.RepeatedScalarFieldContainer[str]
    include_purchased: bool
    def __init__(self, customer_id: _Optional[str] = ..., product_id: _Optional[str] = ..., channel: _Optional[_Union[Channel, str]] = ..., limit: _Optional[int] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., exclude_product_ids: _Optional[_Iterable[str]] = ..., include_purchased: _Optional[bool] = ...) -> None: ...

class ValueTerms(_message.Message):
    __slots__ = ("relevance_timeliness", "privacy_loss", "trust", "fatigue", "times_shown", "value", "min_value")
    RELEVANCE_TIMELINESS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    FATIGUE_FIELD_NUMBER: _ClassVar[int]
    TIMES_SHOWN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    relevance_timeliness: float
    privacy_loss: float
    trust: float
    fatigue: float
    times_shown: int
    value: float
    min_value: float
    def __init__(self, relevance_timeliness: _Optional[float] = ..., privacy_loss: _Optional[float] = ..., trust: _Optional[float] = ..., fatigue: _Optional[float] = ..., times_shown: _Optional[int] = ..., value: _Optional[float] = ..., min_value: _Optional[float] = ...) -> None: ...

class ExplainRecommendationResponse(_message.Message):
    __slots__ = ("customer_id", "product_id", "in_answer", "rank", "score", "personalized", "not_personalized_reason", "removed_by", "detail", "reasons", "terms", "title", "category", "model_version")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    IN_ANSWER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    NOT_PERSONALIZED_REASON_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    product_id: str
    in_answer: bool
    rank: int
    score: float
    personalized: bool
    not_personalized_reason: NotPersonalizedReason
    removed_by: Rule
    detail: str
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    terms: ValueTerms
    title: str
    category: str
    model_version: str
    def __init__(self, customer_id: _Optional[str] = ..., product_id: _Optional[str] = ..., in_answer: _Optional[bool] = ..., rank: _Optional[int] = ..., score: _Optional[float] = ..., personalized: _Optional[bool] = ..., not_personalized_reason: _Optional[_Union[NotPersonalizedReason, str]] = ..., removed_by: _Optional[_Union[Rule, str]] = ..., detail: _Optional[str] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., terms: _Optional[_Union[ValueTerms, _Mapping]] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
