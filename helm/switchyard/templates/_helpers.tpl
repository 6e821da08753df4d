{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.fullname" -}}
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

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "switchyard.selector" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "switchyard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if and (eq .Values.workers.device "cuda") (not .Values.image.tag) -}}
{{- $tag = printf "%s-cuda" $tag -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* etcd client endpoints, comma-separated. */}}
{{- define "switchyard.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $full := include "switchyard.fullname" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "%s://%s-etcd-%d.%s-etcd.%s.svc:2379" (include "switchyard.etcdScheme" $) $full $i $full $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- required "etcd.external.endpoints is required when etcd.enabled is false" .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by the coordinator and the workers. */}}
{{- define "switchyard.env" -}}
- name: SWITCHYARD_ETCD
  value: {{ include "switchyard.etcdEndpoints" . | quote }}
{{- if and .Values.etcd.enabled .Values.etcd.tls.enabled }}
- name: SWITCHYARD_ETCD_CA_FILE
  value: /etc/switchyard/etcd-tls/ca.crt
- name: SWITCHYARD_ETCD_CERT_FILE
  value: /etc/switchyard/etcd-tls/tls.crt
- name: SWITCHYARD_ETCD_KEY_FILE
  value: /etc/switchyard/etcd-tls/tls.key
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
- name: SWITCHYARD_ETCD_CA_FILE
  value: /etc/switchyard/etcd-tls/ca.crt
- name: SWITCHYARD_ETCD_CERT_FILE
  value: /etc/switchyard/etcd-tls/tls.crt
- name: SWITCHYARD_ETCD_KEY_FILE
  value: /etc/switchyard/etcd-tls/tls.key
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.auth.enabled }}
- name: SWITCHYARD_ETCD_USER
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.auth.secretName }}
      key: username
- name: SWITCHYARD_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.auth.secretName }}
      key: password
{{- end }}
{{- end -}}

{{/* Volumes shared by the coordinator and the workers. */}}
{{- define "switchyard.volumes" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- else }}
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ required "etcd.external.tls.secretName is required with TLS" .Values.etcd.external.tls.secretName }}
{{- end }}
{{- if and .Values.etcd.enabled .Values.etcd.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ include "switchyard.fullname" . }}-etcd-tls
{{- end }}
{{- if .Values.tls.public.secretName }}
- name: tls-public
  secret:
    secretName: {{ .Values.tls.public.secretName }}
{{- end }}
{{- if .Values.tls.control.secretName }}
- name: tls-control
  secret:
    secretName: {{ .Values.tls.control.secretName }}
{{- end }}
{{- end -}}

{{- define "switchyard.volumeMounts" -}}
- name: model
  mountPath: {{ dir .Values.model.path }}
  readOnly: {{ not .Values.model.init.enabled }}
- name: tmp
  mountPath: /tmp
{{- if or (and (not .Values.etcd.enabled) .Values.etcd.external.tls.enabled) (and .Values.etcd.enabled .Values.etcd.tls.enabled) }}
- name: etcd-tls
  mountPath: /etc/switchyard/etcd-tls
  readOnly: true
{{- end }}
{{- if .Values.tls.public.secretName }}
- name: tls-public
  mountPath: /etc/switchyard/tls/public
  readOnly: true
{{- end }}
{{- if .Values.tls.control.secretName }}
- name: tls-control
  mountPath: /etc/switchyard/tls/control
  readOnly: true
{{- end }}
{{- end -}}

{{- define "switchyard.modelInit" -}}
{{- if .Values.model.init.enabled }}
initContainers:
  - name: model-init
    image: {{ .Values.model.init.image }}
    command: {{ toJson .Values.model.init.command }}
    securityContext:
      {{- toYaml .Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: model
        mountPath: {{ dir .Values.model.path }}
{{- end }}
{{- end -}}

{{/* The Secret holding the admin keys: the user's, or the one the chart creates. */}}
{{- define "switchyard.adminSecret" -}}
{{- default (printf "%s-admin" (include "switchyard.fullname" .)) .Values.coordinator.adminKeysSecret -}}
{{- end -}}

{{/* http or https for the bundled etcd's URLs. */}}
{{- define "switchyard.etcdScheme" -}}
{{- if .Values.etcd.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}
