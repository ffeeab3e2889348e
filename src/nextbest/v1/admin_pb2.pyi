from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "created_at", "cf_model", "customers", "products", "content_items", "reference_time", "loaded_at", "manifest_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CF_MODEL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMERS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TIME_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: str
    cf_model: str
    customers: int
    products: int
    content_items: int
    reference_time: str
    loaded_at: str
    manifest_json: str
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[str] = ..., cf_model: _Optional[str] = ..., customers: _Optional[int] = ..., products: _Optional[int] = ..., content_items: _Optional[int] = ..., reference_time: _Optional[str] = ..., loaded_at: _Optional[str] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "changed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    changed: bool
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...
