"""Loading the registry from YAML files and resolving model names and aliases."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from inferpool._exceptions import ConfigurationError, ModelNotFound, RegistryError
from inferpool.constants import DETECTOR_ENTRY_POINT_GROUP, split_adapter
from inferpool.model_registry.discovery import discover_models
from inferpool.model_registry.spec import DiscoverSpec, ModelSpec, ProviderSpec, RegistryFile
from inferpool.plumbing.plugins import load_plugin
from inferpool.plumbing.settings import Settings


def _describe_validation_error(source: str, data: object, exc: ValidationError) -> str:
    lines = [f"{source}: invalid registry"]
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(part) for part in loc)
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int) and isinstance(data, dict):
            entries = data.get("models")
            if isinstance(entries, list) and loc[1] < len(entries) and isinstance(entries[loc[1]], dict):
                name = entries[loc[1]].get("name", f"#{loc[1]}")
                where = f"model {name!r}, field {'.'.join(str(p) for p in loc[2:]) or '(entry)'}"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


#: No registry nests deeper than this; deeper input is refused before PyYAML's recursive composer sees it.
MAX_YAML_DEPTH = 64


def _check_depth(text: str, source: str) -> None:
    """Refuse YAML nested past ``MAX_YAML_DEPTH`` from its parse events (PyYAML's parser keeps an explicit stack;
    only building the document recurses, and a RecursionError deep in it is slow and leaves noise behind)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RegistryError(f"{source}: not usable YAML: nested more than {MAX_YAML_DEPTH} deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_registry_text(text: str, source: str) -> RegistryFile:
    """Parse one registry document; errors name the source, the model entry and the field."""
    try:
        _check_depth(text, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise RegistryError(f"{source}: not usable YAML: nested too deeply") from exc
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date that does not exist
        raise RegistryError(f"{source}: not usable YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: the top level must be a mapping with a 'models' list")
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as exc:
        raise RegistryError(_describe_validation_error(source, data, exc)) from exc


def _with_provider(spec: ModelSpec, providers: dict[str, ProviderSpec]) -> ModelSpec:
    """``spec`` with its provider's backend and default params filled in."""
    if spec.provider is None:
        if not spec.backend:
            raise RegistryError(f"model {spec.name!r}: give a backend or a provider")
        return spec
    provider = providers.get(spec.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "(none)"
        raise RegistryError(f"model {spec.name!r}: provider {spec.provider!r} is not defined; providers: {known}")
    backend = spec.backend or provider.backend_name()
    return spec.model_copy(update={"backend": backend, "params": {**provider.default_params(), **spec.params},
                                   "hooks": [*provider.hooks, *spec.hooks],
                                   "batch_api": spec.batch_api or provider.batch_api})  # fmt: skip


def _check_detector(spec: ModelSpec) -> None:
    """A detector named by a registry entry must resolve now, not when a worker first detects."""
    if spec.detector is None or spec.detector == "none":  # detection.plugins.NO_DETECTOR
        return
    try:
        load_plugin(DETECTOR_ENTRY_POINT_GROUP, spec.detector, "detector", allow_path=True)
    except ConfigurationError as exc:
        raise RegistryError(f"model {spec.name!r}: {exc}") from None


class Registry:
    """The models inferpool knows, by name and alias."""

    def __init__(self, models: Iterable[ModelSpec], sources: Iterable[str] = ()) -> None:
        #: Where the models came from (for messages such as "not in the registry this process uses").
        self.sources = list(sources)
        self._models: dict[str, ModelSpec] = {}
        for spec in models:
            self._models[spec.name] = spec
        self._aliases: dict[str, str] = {}
        for spec in self._models.values():
            for alias in spec.aliases:
                clashes_with_model = alias in self._models and alias != spec.name
                if clashes_with_model or self._aliases.get(alias, spec.name) != spec.name:
                    raise RegistryError(f"alias {alias!r} of model {spec.name!r} is already a model or alias")
                self._aliases[alias] = spec.name
        self._check_replacements()
        for spec in self._models.values():
            for fallback in spec.fallbacks:
                target = self._aliases.get(fallback, fallback)
                if target not in self._models or target == spec.name:
                    why = "is the model itself" if target == spec.name else "is not in the registry"
                    raise RegistryError(f"model {spec.name!r}: fallback {fallback!r} {why}")

    def _check_replacements(self) -> None:
        """Every deprecated model's replacement exists, and no chain of replacements loops."""
        for spec in self._models.values():
            seen = [spec.name]
            current = spec
            while current.deprecation is not None and current.deprecation.replacement is not None:
                target = self._aliases.get(current.deprecation.replacement, current.deprecation.replacement)
                if target not in self._models:
                    raise RegistryError(
                        f"model {current.name!r}: deprecation.replacement {current.deprecation.replacement!r} "
                        "is not in the registry"
                    )
                if target in seen:
                    raise RegistryError(f"deprecation replacements loop: {' -> '.join([*seen, target])}")
                seen.append(target)
                current = self._models[target]

    @classmethod
    def load(cls, extra_files: Iterable[Path] = (), models_dirs: Iterable[Path] = ()) -> Registry:
        """The built-in registry, then the models found in ``models_dirs``, then ``extra_files`` merged
        over them (a later model replaces an earlier one of the same name).

        A file's ``discover`` entries add the models found in their directories (a relative path is
        relative to the file) before the file's own ``models``, which can therefore refine them.
        """
        extra_files, models_dirs = list(extra_files), list(models_dirs)
        builtin = resources.files("inferpool.model_registry").joinpath("default_registry.yaml")
        builtin_document = parse_registry_text(builtin.read_text(encoding="utf-8"), "built-in registry")
        specs = list(builtin_document.models)
        providers = dict(builtin_document.providers)
        for directory in models_dirs:
            specs += discover_models(DiscoverSpec(path=directory))
        for path in extra_files:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise RegistryError(f"cannot read registry file {path}: {exc.strerror}") from exc
            document = parse_registry_text(text, str(path))
            for discover in document.discover:
                located = discover.model_copy(update={"path": Path(path).parent / discover.path.expanduser()})
                specs += discover_models(located)
            specs += document.models
            providers.update(document.providers)
        for spec in specs:
            _check_detector(spec)
        sources = ["built-in registry", *(f"models dir {d}" for d in models_dirs), *(str(p) for p in extra_files)]
        return cls((_with_provider(spec, providers) for spec in specs), sources)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry ``settings`` describe: user file (``~/.config/inferpool/registry.yaml``, if it
        exists), ``INFERPOOL_MODELS_DIR`` and ``INFERPOOL_REGISTRY``."""
        user_file = settings.user_registry_file()
        files = ([user_file] if user_file.is_file() else []) + list(settings.registry)
        return cls.load(files, settings.models_dir)

    def describe_sources(self) -> str:
        """``built-in registry, /etc/inferpool/registry.yaml`` (or ``given models`` when built in code)."""
        return ", ".join(self.sources) or "given models"

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._models or name in self._aliases)

    def get(self, name: str) -> ModelSpec:
        """The model called ``name`` (or with that alias), or ``ModelNotFound`` listing what exists.

        ``"<model>:<adapter>"`` is the model serving one of its LoRA adapters: the base model's spec,
        once the adapter is known to be registered.
        """
        base, adapter = split_adapter(name)
        canonical = self._aliases.get(base, base)
        try:
            spec = self._models[canonical]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "(none)"
            raise ModelNotFound(f"model {base!r} is not in the registry; known models: {known}") from None
        if adapter is not None and adapter not in spec.lora_adapters:
            adapters = ", ".join(sorted(spec.lora_adapters)) or "(none)"
            raise ModelNotFound(f"model {spec.name!r} has no LoRA adapter {adapter!r}; its adapters: {adapters}")
        return spec
