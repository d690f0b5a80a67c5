{{/* Names, labels and the operator's RBAC rules. */}}

{{- define "kompressor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kompressor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object, without a component. */}}
{{- define "kompressor.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kompressor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kompressor
{{- end -}}

{{- define "kompressor.labels" -}}
{{ include "kompressor.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kompressor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kompressor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kompressor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kompressor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kompressor.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The watched namespaces as a list; empty = the whole cluster. */}}
{{- define "kompressor.watchNamespaces" -}}
{{- $ns := .Values.watchNamespace -}}
{{- if kindIs "string" $ns -}}
{{- if $ns -}}{{- list $ns | toJson -}}{{- else -}}[]{{- end -}}
{{- else -}}
{{- $ns | uniq | toJson -}}
{{- end -}}
{{- end -}}

{{- define "kompressor.claimName" -}}
{{- default (printf "%s-artifacts" (include "kompressor.fullname" .)) .Values.artifacts.persistence.existingClaim -}}
{{- end -}}

{{- define "kompressor.artifactStore" -}}
{{- printf "pvc://%s/%s" (include "kompressor.claimName" .) (trimAll "/" .Values.artifacts.prefix) -}}
{{- end -}}

{{/* The name is fixed: the operator binds it by this name in each namespace of a CompressedModel. */}}
{{- define "kompressor.driftWatcherRole" -}}kompressor-drift-watcher{{- end -}}

{{/*
The operator's RBAC rules for one scope ("namespace" or "cluster"), as a YAML list. They come from
files/operator-rules.yaml, which charts/render_bundle.py generates from
kompressor.k8s.permissions.required_rules() (derived from the API calls in the code); tests/packaging
checks it is current and that the rendered roles cover every rule. Peering rules only when peering is on,
and only those of the operator's mode (ClusterKopfPeering cluster-wide, KopfPeering per namespace).
Call with (dict "root" $ "scope" "namespace").
*/}}
{{- define "kompressor.rules" -}}
{{- $root := .root -}}
{{- $clusterwide := eq (include "kompressor.watchNamespaces" $root) "[]" -}}
{{- $out := list -}}
{{- range (($root.Files.Get "files/operator-rules.yaml") | fromYaml).rules -}}
{{- $peering := (get . "peering") | default "" -}}
{{- $wanted := or (not $peering) (and $root.Values.peering.enabled (eq $peering (ternary "clusterwide" "namespaced" $clusterwide))) -}}
{{- if and (eq .scope $.scope) $wanted -}}
{{- $out = append $out (omit . "scope" "peering") -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
