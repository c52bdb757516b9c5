{{/* Labels of one component's objects (the same as manifests/base); the argument is the component. */}}
{{- define "pdorch.componentLabels" -}}
app.kubernetes.io/name: pdorch
app.kubernetes.io/component: {{ . }}
{{- end -}}

{{/* Labels of the controller's objects (and of the shared Namespace). */}}
{{- define "pdorch.labels" -}}
{{ include "pdorch.componentLabels" "controller" }}
{{- end -}}

{{/* Pod-level security of every pdorch pod: the restricted Pod Security Standard. */}}
{{- define "pdorch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security of every pdorch container; its root filesystem is read-only. */}}
{{- define "pdorch.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "pdorch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
