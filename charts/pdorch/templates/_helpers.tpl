{{/* Labels every object carries (the same as manifests/base). */}}
{{- define "pdorch.labels" -}}
app.kubernetes.io/name: pdorch
app.kubernetes.io/component: controller
{{- end -}}

{{/* Labels of the built-in autoscaler's objects. */}}
{{- define "pdorch.scalerLabels" -}}
app.kubernetes.io/name: pdorch
app.kubernetes.io/component: scaler
{{- end -}}

{{- define "pdorch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
