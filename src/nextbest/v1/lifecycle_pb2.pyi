from nextbest.v1 import recommender_pb2 as _recommender_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_NEW: _ClassVar[Stage]
    STAGE_ACTIVE: _ClassVar[Stage]
    STAGE_AT_RISK: _ClassVar[Stage]
    STAGE_DORMANT: _ClassVar[Stage]
    STAGE_LAPSED: _ClassVar[Stage]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_WELCOME: _ClassVar[Action]
    ACTION_HUMAN_TOUCH: _ClassVar[Action]
    ACTION_WIN_BACK: _ClassVar[Action]
    ACTION_CARE: _ClassVar[Action]
    ACTION_REPLENISH: _ClassVar[Action]
    ACTION_CROSS_SELL: _ClassVar[Action]
    ACTION_REST: _ClassVar[Action]
STAGE_UNSPECIFIED: Stage
STAGE_NEW: Stage
STAGE_ACTIVE: Stage
STAGE_AT_RISK: Stage
STAGE_DORMANT: Stage
STAGE_LAPSED: Stage
ACTION_UNSPECIFIED: Action
ACTION_WELCOME: Action
ACTION_HUMAN_TOUCH: Action
ACTION_WIN_BACK: Action
ACTION_CARE: Action
ACTION_REPLENISH: Action
ACTION_CROSS_SELL: Action
ACTION_REST: Action

class GetCustomerStateRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class CustomerState(_message.Message):
    __slots__ = ("customer_id", "personalized", "not_personalized_reason", "stage", "churn_risk", "expected_purchases", "expected_value", "active_days_30", "interval_days", "days_since_last_purchase", "purchase_days", "reasons", "risk_model", "horizon_days", "model_version")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    NOT_PERSONALIZED_REASON_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CHURN_RISK_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PURCHASES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DAYS_30_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_DAYS_FIELD_NUMBER: _ClassVar[int]
    DAYS_SINCE_LAST_PURCHASE_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_DAYS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RISK_MODEL_FIELD_NUMBER: _ClassVar[int]
    HORIZON_DAYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    personalized: bool
    not_personalized_reason: str
    stage: Stage
    churn_risk: float
    expected_purchases: float
    expected_value: float
    active_days_30: int
    interval_days: float
    days_since_last_purchase: int
    purchase_days: int
    reasons: _containers.RepeatedScalarFieldContainer[str]
    risk_model: str
    horizon_days: float
    model_version: str
    def __init__(self, customer_id: _Optional[str] = ..., personalized: _Optional[bool] = ..., not_personalized_reason: _Optional[str] = ..., stage: _Optional[_Union[Stage, str]] = ..., churn_risk: _Optional[float] = ..., expected_purchases: _Optional[float] = ..., expected_value: _Optional[float] = ..., active_days_30: _Optional[int] = ..., interval_days: _Optional[float] = ..., days_since_last_purchase: _Optional[int] = ..., purchase_days: _Optional[int] = ..., reasons: _Optional[_Iterable[str]] = ..., risk_model: _Optional[str] = ..., horizon_days: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class NextBestActionRequest(_message.Message):
    __slots__ = ("customer_id", "channel", "limit")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    channel: _recommender_pb2.Channel
    limit: int
    def __init__(self, customer_id: _Optional[str] = ..., channel: _Optional[_Union[_recommender_pb2.Channel, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class NextBestActionResponse(_message.Message):
    __slots__ = ("customer_id", "action", "personalized", "not_personalized_reason", "products", "content", "reasons", "state", "model_version", "experiment", "attribution_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_FIELD_NUMBER: _ClassVar[int]
    NOT_PERSONALIZED_REASON_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    action: Action
    personalized: bool
    not_personalized_reason: str
    products: _containers.RepeatedCompositeFieldContainer[_recommender_pb2.RecommendedProduct]
    content: _containers.RepeatedCompositeFieldContainer[_recommender_pb2.ScoredContent]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    state: CustomerState
    model_version: str
    experiment: _recommender_pb2.ExperimentArm
    attribution_id: str
    def __init__(self, customer_id: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., personalized: _Optional[bool] = ..., not_personalized_reason: _Optional[str] = ..., products: _Optional[_Iterable[_Union[_recommender_pb2.RecommendedProduct, _Mapping]]] = ..., content: _Optional[_Iterable[_Union[_recommender_pb2.ScoredContent, _Mapping]]] = ..., reasons: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[CustomerState, _Mapping]] = ..., model_version: _Optional[str] = ..., experiment: _Optional[_Union[_recommender_pb2.ExperimentArm, _Mapping]] = ..., attribution_id: _Optional[str] = ...) -> None: ...

class StreamAudienceRequest(_message.Message):
    __slots__ = ("stage", "action", "channel", "limit", "max_customers")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CUSTOMERS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    action: Action
    channel: _recommender_pb2.Channel
    limit: int
    max_customers: int
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., action: _Optional[_Union[Action, str]] = ..., channel: _Optional[_Union[_recommender_pb2.Channel, str]] = ..., limit: _Optional[int] = ..., max_customers: _Optional[int] = ...) -> None: ...

class AudienceMember(_message.Message):
    __slots__ = ("customer_id", "state", "action", "products", "content", "reasons")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    state: CustomerState
    action: Action
    products: _containers.RepeatedCompositeFieldContainer[_recommender_pb2.RecommendedProduct]
    content: _containers.RepeatedCompositeFieldContainer[_recommender_pb2.ScoredContent]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, customer_id: _Optional[str] = ..., state: _Optional[_Union[CustomerState, _Mapping]] = ..., action: _Optional[_Union[Action, str]] = ..., products: _Optional[_Iterable[_Union[_recommender_pb2.RecommendedProduct, _Mapping]]] = ..., content: _Optional[_Iterable[_Union[_recommender_pb2.ScoredContent, _Mapping]]] = ..., reasons: _Optional[_Iterable[str]] = ...) -> None: ...
