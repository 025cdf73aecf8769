{{- define "ouroboros.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ouroboros.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "draft") */}}
{{- define "ouroboros.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ouroboros.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ouroboros.modelClaim" -}}
{{- if .Values.models.existingClaim -}}
{{ .Values.models.existingClaim }}
{{- else if .Values.models.createClaim.enabled -}}
{{ include "ouroboros.fullname" . }}-models
{{- end -}}
{{- end -}}

{{/*
A Deployment for one component.
(dict "root" $ "component" "target" "values" .Values.target "command" (list ...) "args" (list ...))
*/}}
{{- define "ouroboros.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $claim := include "ouroboros.modelClaim" $root -}}
{{- $image := include "ouroboros.image" $root -}}
{{- if and (eq .component "target") $v.gpu.enabled -}}
{{- $image = printf "%s%s" $image $v.gpu.imageTagSuffix -}}
{{- end -}}
{{- /* TLS: the Secret this component serves with, and the orchestrator's toward the services. */ -}}
{{- $tls := $root.Values.tls -}}
{{- $serverSecret := "" -}}
{{- $clientSecret := "" -}}
{{- if eq .component "orchestrator" -}}
{{- $serverSecret = $tls.publicSecret -}}
{{- if $tls.enabled -}}
{{- $clientSecret = required "tls.enabled needs tls.clientSecret (its ca.crt verifies the services)" $tls.clientSecret -}}
{{- end -}}
{{- else if $tls.enabled -}}
{{- $serverSecret = required "tls.enabled needs tls.internalSecret" $tls.internalSecret -}}
{{- end -}}
{{- $probePort := ternary $tls.healthPort $v.port (ne $serverSecret "") -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "ouroboros.fullname" $root }}-{{ .component }}
  labels:
    {{- include "ouroboros.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "ouroboros.selector" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "ouroboros.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      {{- if $root.Values.metrics.enabled }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metrics.port | quote }}
        prometheus.io/path: /metrics
      {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default (add ($v.drainTimeoutSeconds | default 30) 30) }}
      {{- if $root.Values.models.fetch.enabled }}
      initContainers:
        - name: fetch-models
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/app/scripts/fetch-models.sh"]
          args:
            {{- toYaml $root.Values.models.fetch.args | nindent 12 }}
          securityContext:
            {{- include "ouroboros.containerSecurity" . | nindent 12 }}
          env:
            - name: OURO_MODELS_DIR
              value: {{ $root.Values.models.mountPath | quote }}
            # pip's cache and the script's scratch files (the root filesystem is read-only).
            - name: HOME
              value: /tmp
          volumeMounts:
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            {{- toYaml .command | nindent 12 }}
          securityContext:
            {{- include "ouroboros.containerSecurity" . | nindent 12 }}
          args:
            {{- $metrics := list }}
            {{- if $root.Values.metrics.enabled }}
            {{- $metrics = list "--metrics-listen" (printf "0.0.0.0:%v" $root.Values.metrics.port) }}
            {{- end }}
            {{- toYaml (concat .args $metrics $v.extraArgs) | nindent 12 }}
          env:
            - name: OURO_MODELS_DIR
              value: {{ $root.Values.models.mountPath | quote }}
            - name: RUST_LOG
              value: info
            {{- with $root.Values.tracing }}
            {{- if .otlpEndpoint }}
            - name: POD_NAME
              valueFrom:
                fieldRef: {fieldPath: metadata.name}
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef: {fieldPath: metadata.namespace}
            - name: OTEL_EXPORTER_OTLP_ENDPOINT
              value: {{ .otlpEndpoint | quote }}
            - name: OTEL_SERVICE_NAME
              value: ouroboros-{{ $.component }}
            - name: OTEL_RESOURCE_ATTRIBUTES
              value: k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)
            - name: OTEL_TRACES_SAMPLER
              value: {{ .sampler | quote }}
            - name: OTEL_TRACES_SAMPLER_ARG
              value: {{ .samplerArg | quote }}
            {{- end }}
            {{- end }}
            {{- if $serverSecret }}
            - name: OURO_TLS_CERT
              value: /etc/ouro/tls/tls.crt
            - name: OURO_TLS_KEY
              value: /etc/ouro/tls/tls.key
            {{- if and $tls.mutual (ne .component "orchestrator") }}
            - name: OURO_TLS_CLIENT_CA
              value: /etc/ouro/tls/ca.crt
            {{- end }}
            - name: OURO_HEALTH_LISTEN
              value: {{ printf "0.0.0.0:%v" $tls.healthPort | quote }}
            {{- end }}
            {{- if $clientSecret }}
            - name: OURO_BACKEND_TLS_CA
              value: /etc/ouro/backend-tls/ca.crt
            {{- if $tls.mutual }}
            - name: OURO_BACKEND_TLS_CERT
              value: /etc/ouro/backend-tls/tls.crt
            - name: OURO_BACKEND_TLS_KEY
              value: /etc/ouro/backend-tls/tls.key
            {{- end }}
            {{- end }}
            {{- with $v.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
            {{- if $v.httpPort }}
            - name: http
              containerPort: {{ $v.httpPort }}
              protocol: TCP
            {{- end }}
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
            {{- if $serverSecret }}
            # gRPC health in plaintext: the kubelet's gRPC probes cannot speak TLS.
            - name: health
              containerPort: {{ $tls.healthPort }}
              protocol: TCP
            {{- end }}
          # gRPC health (grpc.health.v1) answers once the model is loaded and serving.
          startupProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: {{ $v.startupProbe.periodSeconds }}
            failureThreshold: {{ $v.startupProbe.failureThreshold }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: {{ $probePort }}
              # SERVING while the process can serve: a service whose model worker stopped
              # fails it (and is restarted); the orchestrator's readiness follows its targets.
              service: liveness
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle:
            # Let endpoints and DNS forget the pod before SIGTERM starts the drain.
            preStop:
              exec:
                command: ["sleep", "5"]
          resources:
            {{- $res := deepCopy $v.resources }}
            {{- if and (eq .component "target") $v.gpu.enabled }}
            {{- $_ := set $res "limits" (merge (dict $v.gpu.resourceName ($v.tp | int)) ($res.limits | default dict)) }}
            {{- $_ := set $res "requests" (merge (dict $v.gpu.resourceName ($v.tp | int)) ($res.requests | default dict)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
            - name: tmp
              mountPath: /tmp
            {{- if $serverSecret }}
            - name: tls
              mountPath: /etc/ouro/tls
              readOnly: true
            {{- end }}
            {{- if $clientSecret }}
            - name: backend-tls
              mountPath: /etc/ouro/backend-tls
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- if $serverSecret }}
        - name: tls
          secret:
            secretName: {{ $serverSecret }}
            # Readable by the pod's group (fsGroup) only.
            defaultMode: 0440
        {{- end }}
        {{- if $clientSecret }}
        - name: backend-tls
          secret:
            secretName: {{ $clientSecret }}
            # Readable by the pod's group (fsGroup) only.
            defaultMode: 0440
        {{- end }}
        - name: models
          {{- if $claim }}
          persistentVolumeClaim:
            claimName: {{ $claim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* Service, HPA and PDB of one component: (dict "root" $ "component" "draft" "values" .Values.draft "headless" true) */}}
{{- define "ouroboros.companions" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $name := printf "%s-%s" (include "ouroboros.fullname" $root) .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "ouroboros.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if .headless }}
  # Headless: DNS returns every ready pod, so clients can spread sessions over them.
  clusterIP: None
  {{- else }}
  type: {{ $v.service.type }}
  {{- end }}
  selector:
    {{- include "ouroboros.selector" (dict "root" $root "component" .component) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if $v.httpPort }}
    - name: http
      port: {{ $v.httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: http
    {{- end }}
    {{- if $root.Values.metrics.enabled }}
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
{{- if and $root.Values.metrics.enabled $root.Values.metrics.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $name }}
  labels:
    {{- include "ouroboros.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $root.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "ouroboros.selector" (dict "root" $root "component" .component) | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $root.Values.metrics.serviceMonitor.interval }}
{{- end }}
{{- if $v.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "ouroboros.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "ouroboros.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  maxUnavailable: {{ $v.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "ouroboros.selector" (dict "root" $root "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Every container: non-root, read-only root filesystem, no privilege escalation, no capabilities. */}}
{{- define "ouroboros.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
