{{/* Labels every object carries (the same as manifests/base). */}}
{{- define "pdorch.labels" -}}
app.kubernetes.io/name: pdorch
app.kubernetes.io/component: controller
{{- end -}}

{{- define "pdorch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
